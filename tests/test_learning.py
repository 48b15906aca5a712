"""What every stage learns: gain, forward and backward transfer against a hand-computed matrix
(with paired intervals), the gold-answer NLL against a direct teacher-forced computation, and
multiple choice by log-likelihood against lm-evaluation-harness on the same model."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safecl.data.records import Example
from safecl.errors import DataError
from safecl.evaluation.likelihood import choice_requests, choice_scores, gold_nll, offered_labels
from safecl.evaluation.matrix import RetentionMatrix, paired_ci
from tests.conftest_eval import model, tok  # noqa: F401  (fixtures)

# every task scored at every row (score_all_tasks): base, safety, math, sent
FULL = [
    ("base", {"refusal": 0.10, "task:math": 0.20, "nll:math": 1.50, "task:sent": 0.50}),
    ("safety", {"refusal": 0.90, "task:math": 0.25, "nll:math": 1.40, "task:sent": 0.55}),
    ("math", {"refusal": 0.80, "task:math": 0.60, "nll:math": 1.00, "task:sent": 0.45}),
    ("sent", {"refusal": 0.75, "task:math": 0.50, "nll:math": 1.10, "task:sent": 0.90}),
]


def full(values=None) -> RetentionMatrix:
    m = RetentionMatrix()
    for stage, scores in FULL:
        m.add_row(stage, scores, values=(values or {}).get(stage))
    return m


def test_gain_fwt_bwt_match_hand_computation():
    m = full()
    L = m.learning()
    # gain = after own stage - just before it; FWT = just before - base; BWT = final - after own
    assert L["task:math"]["gain"] == pytest.approx(0.60 - 0.25)
    assert L["task:math"]["fwt"] == pytest.approx(0.25 - 0.20)
    assert L["task:math"]["bwt"] == pytest.approx(0.50 - 0.60)
    assert L["task:sent"]["gain"] == pytest.approx(0.90 - 0.45)
    assert L["task:sent"]["fwt"] == pytest.approx(0.45 - 0.50)
    assert L["task:sent"]["bwt"] is None  # its own stage is the final row
    assert (L["task:math"]["base"], L["task:math"]["before"], L["task:math"]["after"]) == (0.20, 0.25, 0.60)
    # NLL is lower-is-better: differences are before - after, so a positive gain is learning
    assert L["nll:math"]["gain"] == pytest.approx(1.40 - 1.00)
    assert L["nll:math"]["fwt"] == pytest.approx(1.50 - 1.40)
    assert L["nll:math"]["bwt"] == pytest.approx(1.00 - 1.10)
    means = m.transfer_means()
    assert means["gain"] == pytest.approx((0.35 + 0.45) / 2)
    assert means["fwt"] == pytest.approx((0.05 - 0.05) / 2)
    assert means["bwt"] == pytest.approx(-0.10)
    assert "refusal" not in L  # safety is tracked by retention, not here


def test_a_task_first_scored_after_its_stage_has_no_gain():
    m = RetentionMatrix()
    m.add_row("base", {"refusal": 0.1})
    m.add_row("safety", {"refusal": 0.9})
    m.add_row("math", {"refusal": 0.8, "task:math": 0.6})
    assert m.learning()["task:math"]["gain"] is None and m.learning()["task:math"]["fwt"] is None


def test_fwt_is_undefined_when_the_stage_follows_the_base_row_directly():
    m = RetentionMatrix(safety_stage="math")
    m.add_row("base", {"task:math": 0.2})
    m.add_row("math", {"task:math": 0.5})
    assert m.learning()["task:math"]["gain"] == pytest.approx(0.3) and m.learning()["task:math"]["fwt"] is None


def test_paired_intervals_resample_items_with_the_same_draw():
    rng = np.random.default_rng(1)
    before = rng.integers(0, 2, 64).astype(float).tolist()
    after = [1.0 if b == 1.0 or rng.random() < 0.5 else 0.0 for b in before]  # only gains, never losses
    values = {"safety": {"task:math": before}, "math": {"task:math": after}}
    rows = [("base", {"refusal": 0.1}), ("safety", {"refusal": 0.9, "task:math": float(np.mean(before))}),
            ("math", {"refusal": 0.8, "task:math": float(np.mean(after))})]
    m = RetentionMatrix()
    for stage, scores in rows:
        m.add_row(stage, scores, values=values.get(stage))
    gain = m.learning()["task:math"]
    lo, hi = gain["gain_ci"]
    assert lo <= gain["gain"] <= hi and lo >= 0.0  # paired: every item's difference is >= 0
    # unpaired resampling of the two rows would reach below 0 for this gain; paired cannot
    assert paired_ci([(after, before)]) == gain["gain_ci"]
    assert paired_ci([(after, before[:-1])]) is None
    # roundtrip keeps the values
    again = RetentionMatrix.from_dict(m.to_dict())
    assert again.learning()["task:math"]["gain_ci"] == gain["gain_ci"]


def test_base_and_after_scores_carry_the_checks_own_interval():
    from safecl.audit.table import format_learning
    from safecl.evaluation.scorers import bootstrap_ci

    base = [0.0] * 60 + [1.0] * 4  # 4/64 before anything
    after = [0.0] * 20 + [1.0] * 44  # 44/64 after its stage
    m = RetentionMatrix()
    m.add_row("base", {"refusal": 0.1, "task:math": 4 / 64}, values={"task:math": base})
    m.add_row("safety", {"refusal": 0.9, "task:math": 4 / 64})  # no values kept: no interval
    m.add_row("math", {"refusal": 0.8, "task:math": 44 / 64}, values={"task:math": after})
    e = m.learning()["task:math"]
    assert e["base_ci"] == list(bootstrap_ci(base)) and e["after_ci"] == list(bootstrap_ci(after))
    assert e["base_ci"][1] < e["after_ci"][0]  # learned beyond both intervals
    row = format_learning(m.learning())[1].splitlines()[-1]
    assert f"0.062 [{e['base_ci'][0]:.2f}, {e['base_ci'][1]:.2f}]" in row and "0.062  " in row  # before: no CI
    assert f"0.688 [{e['after_ci'][0]:.2f}, {e['after_ci'][1]:.2f}]" in row


def test_end_of_run_time_line_reads_each_stage_and_the_wall(tmp_path):
    import json

    from safecl.cli import time_line

    assert time_line(tmp_path) is None  # no run.json: nothing to say
    (tmp_path / "base_check.json").write_text(json.dumps({"seconds": 41.2}))
    (tmp_path / "run.json").write_text(json.dumps({
        "started": "2026-12-07T01:00:00+00:00", "ended": "2026-12-07T01:09:12+00:00",
        "stages": [{"name": "safety", "train_seconds": 180.4, "check_seconds": 39.6},
                   {"name": "math", "train_seconds": 60.0, "check_seconds": None}]}))
    assert time_line(tmp_path) == ("[safecl] time: base check 41 s | safety 180 s train + 40 s check | "
                                   "math 60 s train | wall 9m 12s")
    run = json.loads((tmp_path / "run.json").read_text())
    for rows, said in (("copied", "base check copied"), ("re-measured (retention settings differ)", "base check 41 s")):
        run["started_from"] = {"run": "/elsewhere", "stage": "safety", "retention_rows": rows}
        (tmp_path / "run.json").write_text(json.dumps(run))
        assert time_line(tmp_path).startswith(f"[safecl] time: {said} |")


def test_nll_columns_are_bounded_below_only():
    m = RetentionMatrix()
    m.add_row("base", {"nll:math": 2.7})  # > 1 is fine for an NLL
    with pytest.raises(ValueError, match="finite NLL"):
        m.add_row("x", {"nll:math": -0.1})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        m.add_row("y", {"task:math": 1.2})


# -- gold-answer NLL ---------------------------------------------------------------------------
def _examples(n=7):
    return [Example([{"role": "user", "content": f"What is {i} plus {i}?" + " Think." * (i % 3)},
                     {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. The answer is {2 * i}."}],
                    answer=str(2 * i), origin=f"mem:{i}") for i in range(n)]


def _direct_nll(model, tok, ex) -> float:
    prompt = tok.apply_chat_template(ex.prompt_messages, tokenize=False, add_generation_prompt=True)
    whole = tok.apply_chat_template(ex.messages, tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(whole[len(prompt):], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = F.log_softmax(logits.float(), -1)
    return -sum(float(logp[len(p) + t - 1, r[t]]) for t in range(len(r))) / len(r)


def test_gold_nll_equals_a_direct_teacher_forced_computation(model, tok):
    exs = _examples()
    got = gold_nll(model, tok, exs, batch_size=3)
    want = [_direct_nll(model, tok, ex) for ex in exs]
    assert got == pytest.approx(want, abs=1e-5)
    assert all(v > 0 for v in got)


def test_gold_nll_is_invariant_to_batch_size_and_padding_side(model, tok):
    exs = _examples()
    ref = gold_nll(model, tok, exs, batch_size=1)
    side = tok.padding_side
    try:
        for padding_side in ("left", "right"):
            tok.padding_side = padding_side
            for bs in (2, 5, 16):
                assert gold_nll(model, tok, exs, batch_size=bs) == pytest.approx(ref, abs=1e-5)
    finally:
        tok.padding_side = side


def test_gold_nll_refuses_an_example_without_a_response(model, tok):
    ex = Example([{"role": "user", "content": "hi"}], answer="1", origin="file.jsonl:3")
    with pytest.raises(DataError, match="file.jsonl:3"):
        gold_nll(model, tok, [ex])


# -- multiple choice by log-likelihood ---------------------------------------------------------
def _mc_examples():
    rows = [("Is water wet? Answer format: true/false", "true"), ("Is fire cold? Answer format: true/false", "false"),
            ("Pick one. Answer1: a cat Answer2: a dog Answer3: a cow\n\nAnswer format: answer1/answer2/answer3",
             "answer2"), ("Is 2 > 1? Answer format: true/false", "true"),
            ("Pick. Answer1: x Answer2: y\n\nAnswer format: answer1/answer2", "answer1")]
    return [Example([{"role": "user", "content": q}, {"role": "assistant", "content": f"the correct answer is {a}"}],
                    answer=a, origin=f"mem:{i}") for i, (q, a) in enumerate(rows)]


def test_offered_labels_are_the_ones_the_prompt_names():
    labels = ["answer1", "answer2", "answer3", "answer4", "answer5"]
    assert offered_labels("Answer format: answer1/answer2/answer3", labels) == labels[:3]
    assert offered_labels("no labels named", ["true", "false"]) == ["true", "false"]


def test_choice_scores_pick_the_highest_summed_loglik(model, tok):
    labels = ["true", "false", "answer1", "answer2", "answer3"]
    exs = _mc_examples()
    out = choice_scores(model, tok, exs, labels, batch_size=2)
    requests = choice_requests(tok, exs, labels)
    assert [len(ll) for ll in out["loglik"]] == [2, 2, 3, 2, 2]
    for ll, pick, value, (_, _, gold) in zip(out["loglik"], out["picked"], out["values"], requests):
        assert pick == int(np.argmax(ll)) and value == float(pick == gold)
        assert all(x < 0 and math.isfinite(x) for x in ll)
    # the same scores at batch 1 (padding does not change a sequence's likelihood)
    again = choice_scores(model, tok, exs, labels, batch_size=1)
    assert np.allclose(np.concatenate(again["loglik"]), np.concatenate(out["loglik"]), atol=1e-4)


def test_choice_scores_agree_with_the_harness_on_the_same_model(model, tok):
    from safecl.evaluation.harness import harness_lm, run_harness

    labels = ["true", "false", "answer1", "answer2", "answer3"]
    exs = _mc_examples()
    ours = choice_scores(model, tok, exs, labels, batch_size=4)
    docs = [{"question": ex.prompt_messages[-1]["content"], "choices": conts, "gold": gold}
            for ex, (_, conts, gold) in zip(exs, choice_requests(tok, exs, labels))]
    theirs = run_harness("arc_easy", docs, harness_lm(model, tok, 4), max_new_tokens=4)
    assert theirs["values"] == ours["values"]
    assert theirs["extracted"] == ours["picked"]


def test_skip_with_the_same_seed_holds_out_what_limit_trains_on(tmp_path):
    from safecl.data.config import DataConfig
    from safecl.data.sources import load_examples
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)])
    train, _ = load_examples(DataConfig(source=str(path), shuffle=True, seed=7, limit=20), seed=1)
    held, _ = load_examples(DataConfig(source=str(path), shuffle=True, seed=7, skip=20, limit=30), seed=99)
    assert len(train) == 20 and len(held) == 30
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held}
    with pytest.raises(DataError, match="skip: 50 leaves no row"):
        load_examples(DataConfig(source=str(path), skip=50))


def test_nll_data_scores_the_nll_on_other_rows_than_the_eval(model, tok, tmp_path):
    """A task whose eval has no gold responses (HumanEval-like) gets its nll:<task> column from
    ``nll_data``, equal to gold_nll on those rows."""
    from safecl.data.sources import load_examples
    from safecl.evaluation.check import run_retention_check
    from safecl.evaluation.config import RetentionConfig, TaskEvalConfig
    from tests.conftest import write_jsonl

    evals = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"What is {i}+{i}?", "answer": str(2 * i)}
                                                   for i in range(4)])
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} it is."}
                                                  for i in range(6)])
    task = TaskEvalConfig(source=str(evals), limit=4, max_new_tokens=4,
                          nll_data={"source": str(gold), "limit": 5})
    cfg = RetentionConfig(harmful={"source": "builtin:harmful-eval", "limit": 2},
                          benign={"source": "builtin:benign-eval", "limit": 2}, max_new_tokens=4)
    load = lambda c: load_examples(c, None, need_response=False)[0]  # noqa: E731
    result = run_retention_check(model, tok, cfg, [("sums", task)], None, 0, load)
    assert [e.name for e in result.evals] == ["refusal", "over_refusal", "task:sums", "nll:sums"]
    nll = result["nll:sums"]
    assert nll.n == 5 and nll.values == pytest.approx(gold_nll(model, tok, load(task.nll_data)), abs=1e-6)


def _sequence_run(path, refusal, nll_after, nll_before=(1.0, 1.0, 1.0, 1.0)):
    """A run directory with a retention.json of one task stage 'math' (nll:math over 4 examples)."""
    rows = [{"stage": "safety", "scores": {"refusal": refusal[0], "over_refusal": 0.2},
             "values": {"nll:math": list(nll_before)}},
            {"stage": "math", "scores": {"refusal": refusal[1], "over_refusal": 0.25},
             "values": {"nll:math": list(nll_after)}}]
    path.mkdir()
    (path / "retention.json").write_text(json.dumps(
        {"version": 1, "safety_stage": "safety", "columns": ["refusal", "over_refusal", "nll:math"], "rows": rows,
         "summary": {}}))
    return f"{path.name}={path}"


def test_sequence_table_gain_and_plasticity_against_hand_computation(tmp_path, capsys):
    """benchmarks/sequence_table.py: gain = mean(before - after) for an NLL, plasticity = gain /
    the reference's gain, retention = refusal / refusal after safety; no ratio against a
    reference whose gain interval spans 0 or lies below it."""
    from benchmarks.sequence_table import main

    ref = _sequence_run(tmp_path / "plain", (0.8, 0.2), (0.6, 0.6, 0.6, 0.6))   # gain 0.4 on every example
    run = _sequence_run(tmp_path / "anchor", (0.8, 0.8), (0.8, 0.8, 0.8, 0.8))  # gain 0.2
    flat = _sequence_run(tmp_path / "flat", (0.8, 0.4), (0.9, 1.1, 0.9, 1.1))   # gain 0, interval spans it
    assert main([ref, run, "--reference", "plain", "--reps", "200", "--out", str(tmp_path / "t")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    row = next(r for r in data["learning"] if r["run"] == "anchor")
    assert row["gain"] == pytest.approx(0.2) and row["ratio"] == pytest.approx(0.5)
    assert row["ratio_ci"] == pytest.approx([0.5, 0.5])
    ret = {(r["run"], r["stage"]): r["retention"] for r in data["safety"]}
    assert ret[("plain", "math")] == pytest.approx(0.25) and ret[("anchor", "math")] == pytest.approx(1.0)
    capsys.readouterr()
    assert main([run, flat, "--reference", "flat", "--reps", "200", "--out", str(tmp_path / "u")]) == 0
    data = json.loads((tmp_path / "u.json").read_text())
    assert all(r["ratio"] is None for r in data["learning"])
    # a reference that lost ground on every example (gain -0.4, interval below 0): no ratio either
    worse = _sequence_run(tmp_path / "worse", (0.8, 0.4), (1.4, 1.4, 1.4, 1.4))
    capsys.readouterr()
    assert main([run, worse, "--reference", "worse", "--reps", "200", "--out", str(tmp_path / "v")]) == 0
    assert all(r["ratio"] is None for r in json.loads((tmp_path / "v.json").read_text())["learning"])


def test_sequence_table_pairs_each_seed_with_its_own_reference_and_averages(tmp_path, capsys):
    """NAME=RUN0,RUN1: seed k of a name is compared with seed k of the reference; the summary's
    mean is over the seeds' own ratios and retentions; a name with another number of runs is refused."""
    from benchmarks.sequence_table import main

    (tmp_path / "s0").mkdir()
    (tmp_path / "s1").mkdir()
    ref0 = _sequence_run(tmp_path / "s0" / "plain", (0.8, 0.2), (0.6, 0.6, 0.6, 0.6)).split("=")[1]  # gain 0.4
    run0 = _sequence_run(tmp_path / "s0" / "anchor", (0.8, 0.8), (0.8, 0.8, 0.8, 0.8)).split("=")[1]  # 0.2: ratio 0.5
    ref1 = _sequence_run(tmp_path / "s1" / "plain", (0.5, 0.1), (0.8, 0.8, 0.8, 0.8)).split("=")[1]  # gain 0.2
    run1 = _sequence_run(tmp_path / "s1" / "anchor", (0.5, 0.4), (0.8, 0.8, 0.8, 0.8)).split("=")[1]  # 0.2: ratio 1.0
    assert main([f"plain={ref0},{ref1}", f"anchor={run0},{run1}", "--reference", "plain", "--reps", "200",
                 "--out", str(tmp_path / "t")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["seeds"] == 2
    per_seed = {r["seed_index"]: r["ratio"] for r in data["learning"] if r["run"] == "anchor"}
    assert per_seed == pytest.approx({0: 0.5, 1: 1.0})
    entry = next(e for e in data["summary"] if e["run"] == "anchor" and e["what"] == "nll:math")
    assert entry["ratio_mean"] == pytest.approx(0.75) and entry["gain_mean"] == pytest.approx(0.2)
    ret = next(e for e in data["summary"] if e["run"] == "anchor" and e["what"] == "retention" and e["stage"] == "math")
    assert ret["seeds"] == pytest.approx([1.0, 0.8]) and ret["seeds_mean"] == pytest.approx(0.9)
    assert "0.75 (0.50 / 1.00)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([f"plain={ref0},{ref1}", f"anchor={run0}", "--reference", "plain"])
