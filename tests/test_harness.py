"""lm-evaluation-harness as a task-eval backend (``metric: harness``): its GSM8K scoring agrees
with safecl's exact match where their definitions match and differs where documented; a smoke run
writes its numbers into the R matrix, metrics.json (with the harness version and task config),
the answers file and the audit; bad config is refused."""

import json

import pytest
from lm_eval.api.model import LM

from safecl.cli import main
from safecl.evaluation.harness import run_harness
from safecl.evaluation.scorers import exact_match_number
from tests.conftest import train_smoke


class CannedLM(LM):
    """Answers each question with a fixed response: the harness's filters and metric do the rest."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answers[r.args[0].strip()] for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


# (response, gold answer): safecl and the harness agree on AGREE; on DIFFER the harness compares strings
AGREE = [("So she has 18 eggs. The answer is 18.", "18"), ("#### 1,000", "1000"), ("It costs $5", "5"),
         ("First 7, then 8", "7"), ("no number here", "3"), ("-4 degrees", "-4"), ("The answer is 42", "41"),
         ("about 1.5e3 of them", "1500")]  # neither reads scientific notation
DIFFER = [("The answer is 18.0", "18"), ("It is 2.50 dollars", "2.5")]


def test_harness_gsm8k_scoring_agrees_with_exact_match_where_definitions_match():
    cases = AGREE + DIFFER
    questions = [f"question {i}?" for i in range(len(cases))]
    out = run_harness("gsm8k", [{"question": q, "answer": a} for q, (_, a) in zip(questions, cases)],
                      CannedLM({q: r for q, (r, _) in zip(questions, cases)}), max_new_tokens=16, chat_template=False)
    ours = [1.0 if exact_match_number(r, a) else 0.0 for r, a in cases]
    assert out["values"][: len(AGREE)] == ours[: len(AGREE)] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert out["values"][len(AGREE):] == [0.0, 0.0] and ours[len(AGREE):] == [1.0, 1.0]  # the documented gap
    assert out["responses"] == [r for r, _ in cases]
    assert out["measured_by"]["backend"] == "lm-evaluation-harness" and out["measured_by"]["version"] == "0.4.13"


def test_a_harness_task_and_a_pass_at_1_task_land_in_the_matrix_metrics_answers_and_audit(tmp_path_factory, capsys):
    from tests.test_execution import CODE_EVAL  # HumanEval pass@1 (3 problems) on the last stage

    harness_eval = "{source: 'builtin:arithmetic', split: test, limit: 4, metric: harness, harness: gsm8k}"
    run = train_smoke(tmp_path_factory, "harness", [
        "train.max_steps=2", "adapter.calibration_steps=1", "retention.harmful.limit=2", "retention.benign.limit=2",
        "retention.max_new_tokens=4", f"stages.1.eval={harness_eval}", CODE_EVAL, "tracking.enabled=false"])
    rows = json.loads((run / "retention.json").read_text())["rows"]
    assert [r["stage"] for r in rows] == ["base", "safety", "arithmetic", "sentiment"]
    assert "task:arithmetic" in rows[2]["scores"] and "task:arithmetic" in rows[3]["scores"]
    assert "task:sentiment" in rows[3]["scores"]  # the pass@1 column
    last = json.loads((run / "stages" / "02-sentiment" / "metrics.json").read_text())["retention"]["evals"]
    assert {e["name"]: e["measured_by"]["metric"] for e in last if e["name"].startswith("task:")} == {
        "task:arithmetic": "harness", "task:sentiment": "pass_at_k"}
    evals = json.loads((run / "stages" / "01-arithmetic" / "metrics.json").read_text())["retention"]["evals"]
    task = next(e for e in evals if e["name"] == "task:arithmetic")
    assert task["n"] == 4 and task["measured_by"]["backend"] == "lm-evaluation-harness"
    assert "dataset_path: json" in task["measured_by"]["task_config"]
    answers = [json.loads(line) for line in (run / "stages" / "01-arithmetic" / "answers.jsonl").read_text().splitlines()]
    mine = [a for a in answers if a["check"] == "task:arithmetic"]
    assert len(mine) == 4 and all(a["verdict"] in ("right", "wrong") for a in mine)
    assert sum(a["verdict"] == "right" for a in mine) / 4 == task["score"]
    capsys.readouterr()
    assert main(["audit", str(run), "--json"]) == 0
    audit = capsys.readouterr().out
    assert "task:arithmetic" in audit and "task:sentiment" in audit


@pytest.mark.parametrize("extra, message", [
    ("metric: harness", "go together"),
    ("harness: gsm8k", "go together"),
    ("metric: harness, harness: mmlu", "gsm8k"),
])
def test_bad_harness_config_is_refused(tmp_path, capsys, extra, message):
    from tests.conftest import SMOKE

    rc = main(["validate", str(SMOKE), f"stages.1.eval={{source: 'builtin:arithmetic', split: test, {extra}}}"])
    assert rc == 2 and message in capsys.readouterr().err
