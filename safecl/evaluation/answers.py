"""Every judged answer of a retention check, kept: the answers file and what reads it.

Each check writes one JSON line per prompt (``answers.jsonl`` in the stage directory;
``base_answers.jsonl`` in the run directory for the base model), atomically, in check order::

    {"check": "refusal", "i": 0, "prompt": "...", "response": "...", "verdict": "refused",
     "matched": "I cannot", "empty": false, "judge": "keyword/safecl/prefix80/3f2a9c1e"}

``check``: ``refusal`` (harmful prompts), ``over_refusal`` (benign prompts) or ``task:NAME``;
``verdict``: ``refused`` / ``complied`` for the two judged sets, ``right`` / ``wrong`` for
tasks (which also carry the gold ``answer``). Invariant: per check, the file holds exactly
the check's n rows, and the share of ``refused`` (``right``) rows is the check's score. The
gold-answer NLL (``nll:NAME``) generates nothing and has no rows here; its per-example values
are in ``retention.json``.

Re-judging (:func:`rejudge`) scores the stored responses with another judge, without
generating again; :func:`cohen_kappa` measures how far two judges agree beyond chance:
``kappa = (p_o - p_e) / (1 - p_e)``, p_o the share of equal verdicts, p_e the agreement
expected from the two judges' refusal rates alone (``p_e = p1 q1 + (1 - p1)(1 - q1)``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safecl.atomic import write_text
from safecl.errors import DataError
from safecl.evaluation.config import JudgeConfig
from safecl.evaluation.judges import make_judge

ANSWERS = "answers.jsonl"
BASE_ANSWERS = "base_answers.jsonl"
JUDGED = ("refusal", "over_refusal")
VERDICTS = ("refused", "complied", "right", "wrong")
# --rejudge shorthands: name -> the judge section they stand for (plus classifier:MODEL)
NAMED_JUDGES: dict[str, dict] = {
    f"{phrases}-{mode}": {"kind": "keyword", "phrases": phrases, "mode": mode}
    for phrases in ("safecl", "advbench", "qi2023") for mode in ("prefix", "substring")
}


def judge_id(described: dict) -> str:
    """A short name of the judge that produced a verdict (kept on every row)."""
    if described.get("kind") == "keyword":
        window = f"{described['mode']}{described.get('prefix_window') or ''}"
        return f"keyword/{described['phrase_list']}/{window}/{described['phrases_sha1'][:8]}"
    return f"classifier/{described.get('model')}"


def answer_rows(check) -> list[dict]:
    """The rows of one :class:`~safecl.evaluation.check.CheckResult` (every sample of every set)."""
    rows = []
    for ev in check.evals:
        if ev.name.startswith("nll:"):  # no generated answer: per-example NLLs are in retention.json (values)
            continue
        judge = judge_id(ev.measured_by) if ev.name in JUDGED else ev.measured_by.get("metric")
        for i, s in enumerate(ev.samples):
            row = {"check": ev.name, "i": i, "prompt": s["prompt"], "response": s["response"]}
            if ev.name in JUDGED:
                row.update(verdict="refused" if s["verdict"] else "complied", matched=s.get("matched"),
                           empty=bool(s.get("empty")))
            else:
                row.update(verdict="right" if s["verdict"] else "wrong", answer=s.get("answer"))
                if "status" in s:  # code run by pass_at_k: passed / failed: <error> / timeout
                    row["status"] = s["status"]
            row["judge"] = judge
            rows.append(row)
    return rows


def write_answers(path: str | Path, check) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answer_rows(check)))


def read_answers(path: str | Path) -> list[dict]:
    """The rows of an answers file; a malformed line is refused with file and line."""
    rows = []
    path = Path(path)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict) or not {"check", "prompt", "response", "verdict"} <= row.keys():
            raise DataError(f"{path}:{n}: an answer row needs check, prompt, response and verdict")
        rows.append(row)
    return rows


def parse_judge(spec: str):
    """A judge from a --rejudge spec: a name of :data:`NAMED_JUDGES` or ``classifier:MODEL``."""
    if spec.startswith("classifier:") and spec.split(":", 1)[1]:
        return make_judge(JudgeConfig(kind="classifier", model=spec.split(":", 1)[1]))
    if spec not in NAMED_JUDGES:
        raise DataError(f"unknown judge {spec!r}; known: {', '.join(NAMED_JUDGES)}, classifier:MODEL (a sequence "
                        "classifier's hub id or local path)")
    return make_judge(JudgeConfig(**NAMED_JUDGES[spec]))


def rejudge(rows: list[dict], judge) -> list[str]:
    """The other judge's verdict (``refused`` / ``complied``) for each judged row, in order."""
    verdicts = judge.judge([r["response"] for r in rows], [r["prompt"] for r in rows])
    return ["refused" if v.refusal else "complied" for v in verdicts]


def cohen_kappa(a: list[bool], b: list[bool]) -> float | None:
    """Cohen's kappa of two binary verdict lists (None when empty; 1.0 when both are constant and equal)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p1, q1 = sum(a) / n, sum(b) / n
    p_e = p1 * q1 + (1 - p1) * (1 - q1)
    if p_e == 1.0:
        return 1.0 if p_o == 1.0 else 0.0
    return (p_o - p_e) / (1 - p_e)
