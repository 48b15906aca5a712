"""Code scored by execution: right and wrong HumanEval completions score 1 and 0; loops, exits,
huge allocations and stray writes end as failed samples without harming the trainer, under both
sandboxes; nothing runs without the recipe's opt-in, and bubblewrap missing refuses the recipe
unless it asks for the process guard by name. Escapes: tests/test_escapes.py."""

import gzip
import json
import os

import pytest

from safecl.cli import main
from safecl.evaluation import sandbox
from safecl.evaluation.execution import Limits, extract_code, humaneval_program, pass_at_k, run_sample
from tests.conftest import ROOT, SMOKE

NO_BWRAP = sandbox.bubblewrap_problem()
BWRAP = pytest.param("bubblewrap", marks=pytest.mark.skipif(
    NO_BWRAP is not None, reason=f"{NO_BWRAP} (CI installs it: {sandbox.INSTALL})"))
SANDBOXES = [BWRAP, "process"]

HUMANEVAL = ROOT.parent / "shared" / "data" / "tasks" / "humaneval" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def problem():
    with gzip.open(HUMANEVAL, "rt") as fh:
        return json.loads(fh.readline())  # HumanEval/0, has_close_elements


def run(problem, completion, timeout=3.0, kind="bubblewrap"):
    return run_sample(humaneval_program(problem["prompt"], completion, problem["test"], problem["entry_point"]),
                      Limits(timeout=timeout), kind)


@pytest.mark.parametrize("kind", SANDBOXES)
def test_the_canonical_solution_passes_and_a_wrong_one_fails(problem, kind):
    assert run(problem, problem["canonical_solution"], kind=kind).passed
    assert run(problem, f"```python\n{problem['prompt']}{problem['canonical_solution']}```", kind=kind).passed
    wrong = run(problem, "    return False\n", kind=kind)
    assert not wrong.passed and "AssertionError" in wrong.status


@pytest.mark.parametrize("kind", SANDBOXES)
@pytest.mark.parametrize("completion, status", [
    ("    while True:\n        pass\n", "timeout"),
    ("    import sys\n    sys.exit(0)\n", "no result"),  # exits 0 before the tests: not a pass
    ("    x = bytearray(8 * 2**30)\n    return True\n", "MemoryError"),
    ("    os.system('touch {marker}')\n    return True\n", "sandbox"),
])
def test_hostile_completions_fail_and_harm_nothing(problem, completion, status, kind, tmp_path):
    marker = tmp_path / "written-by-the-sample"
    out = run(problem, "    import os\n" + completion.format(marker=marker), timeout=2.0, kind=kind)
    assert not out.passed and status in out.status
    assert not marker.exists()


@pytest.mark.parametrize("kind", SANDBOXES)
def test_a_write_outside_the_working_directory_fails(problem, kind, tmp_path):
    target = tmp_path / "outside.txt"
    out = run(problem, f"    open({str(target)!r}, 'w').write('x')\n    return True\n", kind=kind)
    assert not out.passed and not target.exists()
    # process: the prelude refuses; bubblewrap: the path is not there (its /tmp is the sample's own tmpfs)
    assert ("writing outside the working directory" if kind == "process" else "No such file") in out.status
    os.environ["HF_TOKEN"] = "hf_secret"
    try:  # the sample sees no inherited secrets: it would exit 3 if it did
        leak = run(problem, "    import os\n    if 'HF_TOKEN' in os.environ:\n        raise SystemExit(3)\n"
                   + problem["canonical_solution"], kind=kind)
        assert leak.passed
    finally:
        del os.environ["HF_TOKEN"]


def test_extract_code_takes_the_first_python_block():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


CODE_EVAL = (f"stages.2.eval={{preset: humaneval, source: {HUMANEVAL}, limit: 3, max_new_tokens: 8, "
             "allow_code_execution: true}")
# the default (bubblewrap) where it runs; elsewhere the run asks for the process guard by name
CODE_EVAL_HERE = CODE_EVAL if NO_BWRAP is None else CODE_EVAL.replace("}", ", sandbox: process}")
FAST = ["train.max_steps=2", "adapter.calibration_steps=1", "retention.harmful.limit=2", "retention.benign.limit=2",
        "retention.max_new_tokens=4", "stages.1.eval.limit=2"]


def test_code_never_runs_without_the_opt_in(tmp_path, capsys):
    assert main(["train", str(SMOKE), f"output_dir={tmp_path / 'x'}", *FAST, "--dry-run",
                 CODE_EVAL.replace(", allow_code_execution: true", "")]) == 2
    err = capsys.readouterr().err
    assert "stages.2.eval" in err and "allow_code_execution: true" in err


def test_without_bubblewrap_a_code_recipe_is_refused_unless_it_asks_for_the_process_guard(tmp_path, capsys,
                                                                                            monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap on the PATH: the real lookup fails
    sandbox.bubblewrap_problem.cache_clear()
    try:
        argv = ["train", str(SMOKE), f"output_dir={tmp_path / 'x'}", *FAST, "--dry-run"]
        assert main([*argv, CODE_EVAL]) == 2
        err = capsys.readouterr().err
        assert "stages.2.eval" in err and "sandbox" in err and "apt-get install bubblewrap" in err
        assert "sandbox: process" in err and "Traceback" not in err
        assert main([*argv, CODE_EVAL.replace("}", ", sandbox: process}")]) == 0
    finally:
        monkeypatch.undo()
        sandbox.bubblewrap_problem.cache_clear()
    assert sandbox.bubblewrap_problem() == NO_BWRAP


def test_a_run_scores_a_code_stage_by_pass_at_1(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(SMOKE), f"output_dir={out}", *FAST, CODE_EVAL_HERE]) == 0
    matrix = json.loads((out / "retention.json").read_text())
    assert "task:sentiment" in matrix["columns"]
    rows = [json.loads(x) for x in (out / "stages" / "02-sentiment" / "answers.jsonl").read_text().splitlines()]
    code = [r for r in rows if r["check"] == "task:sentiment"]
    assert [r["answer"] for r in code] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["verdict"] == "wrong" and r["status"] != "passed" for r in code)  # a tiny random model
    ev = next(e for e in json.loads((out / "stages" / "02-sentiment" / "metrics.json").read_text())["retention"][
        "evals"] if e["name"] == "task:sentiment")
    assert ev["measured_by"]["metric"] == "pass_at_k" and ev["n"] == 3 and ev["score"] == 0.0
    assert ev["measured_by"]["sandbox"]["kind"] == ("bubblewrap" if NO_BWRAP is None else "process")
    assert main(["audit", str(out), "--json"]) == 0
    assert "task:sentiment" in capsys.readouterr().out


@pytest.mark.parametrize("kind", SANDBOXES)
def test_sampled_pass_at_k_counts_each_problems_passing_answers(kind):
    """n answers per problem, c of them right: the score is the mean unbiased pass@k over problems."""
    from safecl.data.sources import load_examples
    from safecl.evaluation.check import _task_set
    from safecl.evaluation.config import RetentionConfig, TaskEvalConfig

    with gzip.open(HUMANEVAL, "rt") as fh:
        canonical = {p["task_id"]: p["canonical_solution"] for p in map(json.loads, fh)}
    task = TaskEvalConfig(preset="humaneval", source=str(HUMANEVAL), limit=2, samples=4, k=2,
                          allow_code_execution=True, sandbox=kind)
    examples, _ = load_examples(task, None, need_response=False)
    right = {0: 1, 1: 3}  # problem -> how many of its 4 answers are its canonical solution
    asked = {}

    def canned(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample=False, **kw):
        asked.update(n=len(prompts), do_sample=do_sample)
        out = []
        for j in range(len(prompts)):
            p, a = divmod(j, 4)
            out.append(canonical[examples[p].answer] if a < right[p] else "    return None\n")
        return out

    ev = _task_set("code", task, examples, None, None, RetentionConfig(), 0, None, False, generate=canned)
    assert asked == {"n": 8, "do_sample": True}
    assert ev.n == 2 and len(ev.samples) == 8 and [s["verdict"] for s in ev.samples[:4]] == [True, False, False, False]
    assert ev.score == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 2)  # (0.5 + 1.0) / 2
    assert ev.measured_by["k"] == 2 and ev.measured_by["samples_per_problem"] == 4
    with pytest.raises(ValueError, match="needs at least 3 samples"):
        TaskEvalConfig(preset="humaneval", source=str(HUMANEVAL), samples=2, k=3, allow_code_execution=True,
                       sandbox="process")
