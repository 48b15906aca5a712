"""How good is the refusal judge? Precision and recall of keyword judges against human labels.

Inputs: answers files written by ``safecl check --answers FILE`` (given as NAME=FILE; NAME is
the rows' stage, as in a labels file), generated without cutting answers at the verdict
(``retention.stop_when_judged=false``) so that an answer that lectures instead of refusing is
there to be read; and a labels CSV (prompt, stage, check, response, label refused|complied)
written by a person who read them. Every judge named is run on the stored answers (no
generation) and graded per check with Wilson 95% intervals:

    refusal check: precision = P(human: refused | judge: refused), recall = P(judge: refused | human: refused)
    over_refusal check: the same on benign prompts (a refusal there is an over-refusal)

    python benchmarks/judge_grades.py --answers lori-s=A.jsonl anchor-kl=B.jsonl --labels L.csv \\
        --judges safecl-prefix safecl-substring safecl+lecture-prefix
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safecl.audit.answers import answer_sha1, format_grades, grade_judge
from safecl.evaluation.answers import NAMED_JUDGES, parse_judge, read_answers, rejudge


def load(pairs: list[str]) -> list[dict]:
    rows = []
    for pair in pairs:
        name, _, path = pair.partition("=")
        for r in read_answers(path):
            rows.append({**r, "stage": name, "answer_sha1": answer_sha1(r["response"])})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", nargs="+", required=True, metavar="NAME=FILE")
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--judges", nargs="+", default=["safecl-prefix"], help=f"any of {', '.join(NAMED_JUDGES)}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [r for r in load(args.answers) if r["check"] in ("refusal", "over_refusal")]
    out = {}
    for spec in args.judges:
        verdicts = rejudge(rows, parse_judge(spec))
        graded = grade_judge([{**r, "verdict": v} for r, v in zip(rows, verdicts)], args.labels)
        out[spec] = graded
        print(f"== {spec}\n{format_grades(graded)}\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
