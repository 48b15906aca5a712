"""``safecl audit RUN_DIR [RUN_DIR ...]``: what each stage kept, in the terminal, as JSON, as a report.

Wiring into the main parser (safecl/cli.py)::

    from safecl.audit.cli import configure_audit_parser
    a = sub.add_parser("audit", help="...", formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_audit_parser(a)          # adds the arguments and set_defaults(func=cmd_audit)

``cmd_audit`` returns 0; a path that is not a run raises
:class:`safecl.audit.load.NotARunError` (a SafeclError: exit code 2, message naming the path),
so the main CLI's error handling applies. ``python -m safecl.audit`` runs the same command
without the main CLI (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safecl.audit.verdict import DEFAULT_MAX_FORGETTING, DEFAULT_MIN_RETENTION
from safecl.errors import SafeclError
from safecl.evaluation.answers import NAMED_JUDGES, VERDICTS

HELP = "Audit run directories: retention matrix, forgetting, BWT and a verdict per stage."
EPILOG = f"""\
examples:
  safecl audit runs/smoke                          table in the terminal
  safecl audit runs/smoke --json > audit.json      the same numbers as one JSON document
  safecl audit runs/smoke --report                 + runs/smoke/report/report.html and report.md
  safecl audit runs/lori-s runs/lora --report=cmp  compare runs side by side, report into cmp/
  safecl audit runs/smoke --answers arithmetic --check refusal --verdict complied
                                                   every answer the judge let through after 'arithmetic'
  safecl audit runs/smoke --rejudge advbench-substring   another judge on the stored answers (kappa)
  safecl audit runs/smoke --labels labels.csv      the judge's precision/recall against your labels

verdict per stage (first match wins): rolled back | gate fired (warn|halt) | in progress |
drifted | kept. drifted = safety retention (refusal / refusal after the safety stage) below
--min-retention (default {DEFAULT_MIN_RETENTION}) or the recipe's gate.min_retention, refusal drop or
over-refusal above the recipe's gate.max_drop / gate.max_over_refusal, or a task whose score
fell more than --max-forgetting (default {DEFAULT_MAX_FORGETTING}) below its best earlier score.
"""


def configure_audit_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the audit arguments to ``p`` and make :func:`cmd_audit` its handler."""
    if p.epilog is None:
        p.epilog = EPILOG
    if p.description is None:
        p.description = HELP
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (a recipe's output_dir)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                   help="write report.html (self-contained) and report.md + PNGs; default DIR: "
                        "<RUN_DIR>/report for one run (required for several). Put it after the run dirs "
                        "or write --report=DIR")
    p.add_argument("--min-retention", type=float, default=DEFAULT_MIN_RETENTION, metavar="X",
                   help=f"safety retention under X counts as drift (default {DEFAULT_MIN_RETENTION})")
    p.add_argument("--max-forgetting", type=float, default=DEFAULT_MAX_FORGETTING, metavar="X",
                   help=f"a task forgetting more than X counts as drift (default {DEFAULT_MAX_FORGETTING})")
    g = p.add_argument_group("every judged answer (one run; kept in <stage>/answers.jsonl)")
    g.add_argument("--answers", nargs="?", const="", default=None, metavar="STAGE",
                   help="list the stored answers (of STAGE, or of every checkpoint: base and each stage), "
                        "marking verdicts that changed since the previous checkpoint")
    g.add_argument("--check", metavar="NAME", help="only this check: refusal, over_refusal or task:NAME")
    g.add_argument("--verdict", choices=VERDICTS, help="only answers with this verdict")
    g.add_argument("--rejudge", metavar="JUDGE",
                   help="score the stored answers with another judge and compare (agreement, Cohen's kappa per "
                        f"stage); JUDGE: {', '.join(NAMED_JUDGES)} or classifier:MODEL")
    g.add_argument("--labels", metavar="FILE",
                   help="CSV or JSONL of human verdicts (prompt, label refused|complied, stage or answer_sha1): "
                        "the judge's precision and recall, and the retention the labels imply")
    p.set_defaults(func=cmd_audit)
    return p


def cmd_answers(args) -> int:
    from safecl.audit import answers as A
    from safecl.audit.load import load_run

    if len(args.run_dirs) != 1:
        raise SafeclError("--answers, --rejudge and --labels read one run at a time")
    record = load_run(args.run_dirs[0])
    rows = A.load_answers(record.path, [(st.name, st.dir) for st in record.stages])
    if args.rejudge:
        doc = A.compare_judges(A.select(rows, args.answers, args.check, None), args.rejudge)
        print(json.dumps(doc, indent=2) if args.json else A.format_comparison(doc))
    if args.labels:
        doc = A.grade_judge(rows, args.labels)
        print(json.dumps(doc, indent=2) if args.json else A.format_grades(doc))
    if args.answers is not None or not (args.rejudge or args.labels):
        picked = A.select(rows, args.answers, args.check, args.verdict)
        print(json.dumps(picked, indent=2, ensure_ascii=False) if args.json else A.format_answers(picked))
    return 0


def report_dir(run_dirs: list[str], report: str | None) -> Path | None:
    """Where ``--report`` writes: the given DIR, else <run>/report for a single run."""
    if report is None:
        return None
    if report:
        return Path(report)
    if len(run_dirs) > 1:
        raise SafeclError("--report needs a directory when auditing several runs (--report=DIR)")
    return Path(run_dirs[0]) / "report"


def cmd_audit(args) -> int:
    from safecl.audit.load import label_runs, load_run
    from safecl.audit.summary import audit_runs
    from safecl.audit.table import format_audit

    if any(x is not None for x in (args.answers, args.rejudge, args.labels)) or args.check or args.verdict:
        return cmd_answers(args)
    out_dir = report_dir(args.run_dirs, args.report)
    records = label_runs([load_run(d) for d in args.run_dirs])
    doc = audit_runs(records, min_retention=args.min_retention, max_forgetting=args.max_forgetting)
    if out_dir is not None:
        from safecl.audit.report import write_report

        paths = write_report(doc, out_dir)
        doc["report"] = {"html": str(paths["html"]), "markdown": str(paths["markdown"])}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_audit(doc))
        if out_dir is not None:
            print(f"\nreport: {doc['report']['html']}\n        {doc['report']['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m safecl.audit``), with the main CLI's exit codes."""
    parser = argparse.ArgumentParser(prog="safecl audit", formatter_class=argparse.RawDescriptionHelpFormatter)
    args = configure_audit_parser(parser).parse_args(argv)
    try:
        return args.func(args)
    except SafeclError as exc:
        print(f"safecl: error: {exc}", file=sys.stderr)
        return exc.exit_code
