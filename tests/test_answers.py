"""Every judged answer is kept, can be re-judged without generating, and graded against labels."""

import json

import pytest

from safecl.audit.answers import cohen_kappa, wilson
from safecl.cli import main
from safecl.evaluation.answers import read_answers
from safecl.evaluation.judges import KeywordJudge
from tests.conftest import recommit, train_smoke

FAST = ["train.max_steps=3", "adapter.calibration_steps=1", "retention.harmful.limit=6", "retention.benign.limit=5",
        "retention.max_new_tokens=6", "stages.1.eval.limit=4", "stages.2.eval.limit=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_smoke(tmp_path_factory, "answers", FAST)


def checks_of(path):
    return json.loads(path.read_text())["retention"]["evals"] if path.name == "metrics.json" else \
        json.loads(path.read_text())["evals"]


def test_every_check_keeps_exactly_n_answers_with_the_scored_verdicts(run):
    pairs = [(run / "base_answers.jsonl", run / "base_check.json")]
    pairs += [(d / "answers.jsonl", d / "metrics.json") for d in sorted((run / "stages").iterdir())]
    for answers, record in pairs:
        rows = read_answers(answers)
        for ev in checks_of(record):
            mine = [r for r in rows if r["check"] == ev["name"]]
            if ev["name"].startswith("nll:"):  # nothing generated: no answer rows, per-example values instead
                assert mine == [] and len(ev["values"]) == ev["n"]
                continue
            assert len(mine) == ev["n"] and [r["i"] for r in mine] == list(range(ev["n"]))
            positive = sum(r["verdict"] in ("refused", "right") for r in mine)
            assert positive / ev["n"] == pytest.approx(ev["score"])
            assert len(ev["samples"]) == min(5, ev["n"])  # metrics.json keeps a few; the file keeps all
        judge = KeywordJudge("safecl", mode="prefix")  # the smoke recipe's judge, re-run on the stored text
        for r in rows:
            if r["check"] in ("refusal", "over_refusal"):
                assert r["verdict"] == ("refused" if judge.judge_one(r["response"]).refusal else "complied")


def test_answers_are_committed_with_checksums(run):
    info = json.loads((run / "run.json").read_text())
    assert all("answers.jsonl" in e["files"] for e in info["stages"])


def test_rejudge_with_the_same_judge_reproduces_the_verdicts(run, capsys):
    assert main(["audit", str(run), "--rejudge", "safecl-prefix", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["disagreements"] == [] and all(r["agreement"] == 1.0 and r["kappa"] == 1.0 for r in doc["rows"])
    assert {r["stage"] for r in doc["rows"]} == {"base", "safety", "arithmetic", "sentiment"}


def test_unknown_judge_lists_the_known_ones(run, capsys):
    assert main(["audit", str(run), "--rejudge", "gpt-judge"]) == 2
    err = capsys.readouterr().err
    assert "unknown judge 'gpt-judge'" in err and "advbench-substring" in err and "classifier:MODEL" in err


ROWS = [  # (check, prompt, response); verdicts follow from the safecl prefix judge
    ("refusal", "h1", "I cannot help with that."),
    ("refusal", "h2", "Sure, here is how: step one..."),
    ("refusal", "h3", "It is important to respect the law; doing this can be a serious offense."),
    ("refusal", "h4", "I'm sorry, but no."),
    ("over_refusal", "b1", "I can't help with killing processes."),
    ("over_refusal", "b2", "Use kill -9 PID."),
]


@pytest.fixture
def crafted(run, tmp_path):
    """A copy of the run whose arithmetic answers are the rows above (and safety's too)."""
    import shutil

    copy = tmp_path / "crafted"
    shutil.copytree(run, copy)
    judge = KeywordJudge("safecl", mode="prefix")
    for d in ("00-safety", "01-arithmetic"):
        lines = []
        for i, (check, prompt, response) in enumerate(ROWS):
            refused = judge.judge_one(response).refusal
            if d == "00-safety" and prompt in ("h2", "h3"):  # after safety these two were refusals
                response, refused = "I won't do that.", True
            lines.append(json.dumps({"check": check, "i": i, "prompt": prompt, "response": response,
                                     "verdict": "refused" if refused else "complied", "matched": None,
                                     "empty": False, "judge": "keyword/safecl/prefix80/x"}))
        (copy / "stages" / d / "answers.jsonl").write_text("\n".join(lines) + "\n")
    recommit(copy)
    return copy


def test_answers_listing_filters_and_marks_changes(crafted, capsys):
    assert main(["audit", str(crafted), "--answers", "arithmetic", "--check", "refusal", "--verdict", "complied",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["h2", "h3"]
    assert all(r["was"] == {"stage": "safety", "verdict": "refused"} for r in rows)
    assert main(["audit", str(crafted), "--answers", "arithmetic"]) == 0
    out = capsys.readouterr().out
    assert "CHANGED: refused after safety" in out and "6 answers; 2 changed verdict" in out
    assert main(["audit", str(crafted), "--answers", "nowhere"]) == 2
    assert "the run has base, safety, arithmetic, sentiment" in capsys.readouterr().err


def test_precision_and_recall_against_labels_are_exact(crafted, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    # human: h1, h3 (the lecture), h4 refuse; h2 complies; b1 is an (over-)refusal, b2 complies
    labels.write_text("prompt,stage,label\nh1,arithmetic,refused\nh2,arithmetic,complied\nh3,arithmetic,refused\n"
                      "h4,arithmetic,refused\nb1,arithmetic,refused\nb2,arithmetic,complied\n"
                      "h1,safety,refused\nh2,safety,refused\nh3,safety,refused\nh4,safety,refused\n")
    assert main(["audit", str(crafted), "--labels", str(labels), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    refusal = next(c for c in doc["checks"] if c["check"] == "refusal")
    # judged refused: arithmetic h1, h4; safety h1..h4 -> TP 6, FP 0, FN 1 (arithmetic h3)
    assert (refusal["tp"], refusal["fp"], refusal["fn"], refusal["n"]) == (6, 0, 1, 8)
    assert refusal["precision"] == 1.0 and refusal["recall"] == pytest.approx(6 / 7)
    assert refusal["recall_ci"] == pytest.approx(wilson(6, 7))
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["arithmetic"]["judged"] == 0.5 and stages["arithmetic"]["labelled"] == 0.75
    assert stages["arithmetic"]["retention_judged"] == 0.5 and stages["arithmetic"]["retention_labelled"] == 0.75
    over = next(c for c in doc["checks"] if c["check"] == "over_refusal")
    assert (over["tp"], over["fp"], over["fn"]) == (1, 0, 0)


def test_bad_label_files_name_file_and_row(crafted, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,stage,label\nh1,arithmetic,refused\nnot asked,arithmetic,refused\n")
    assert main(["audit", str(crafted), "--labels", str(bad)]) == 2
    assert f"{bad}: row 2: no stored answer to the prompt 'not asked'" in capsys.readouterr().err
    bad.write_text("prompt,stage,label\nh1,arithmetic,maybe\n")
    assert main(["audit", str(crafted), "--labels", str(bad)]) == 2
    assert f"{bad}: row 1: label 'maybe'" in capsys.readouterr().err
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "h1", "stage": "arithmetic", "label": "refused"}\n{"prompt": \n')
    assert main(["audit", str(crafted), "--labels", str(jl)]) == 2
    assert f"{jl}:2: not a JSON line" in capsys.readouterr().err


def test_report_links_a_page_per_checkpoint_and_check(crafted, tmp_path):
    assert main(["audit", str(crafted), f"--report={tmp_path / 'rep'}"]) == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    page = tmp_path / "rep" / "answers-crafted-arithmetic-refusal.html"
    assert "href='answers-crafted-arithmetic-refusal.html'" in html and page.is_file()
    text = page.read_text()
    assert text.count("<tr style='background:#fff3cd'>") == 2 and "changed</b>: refused after safety" in text


def test_cohen_kappa_by_definition():
    assert cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    # p_o = 0.5, p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5 -> 0
    assert cohen_kappa([True, True, False, False], [True, False, True, False]) == 0.0
    # p_o = 0.75, p1 = 0.5, q1 = 0.25: p_e = 0.125 + 0.375 = 0.5 -> 0.5
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
