"""Command line: thin wrappers around the library; errors become messages and exit codes.

Exit codes: 0 ok, 2 bad input (recipe, data, model) or a full disk, 3 the retention gate halted
the run, 1 an unexpected error (a bug: the traceback is printed).

A full disk (ENOSPC, EDQUOT) anywhere safecl writes ends the command with one line that names
the file and the next command (``safecl train ... --resume`` for a run; the same command again
otherwise); every write is atomic, so what was committed before stays as it was.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from safecl import __version__
from safecl.errors import SafeclError
from safecl.faults import guard_interrupts
from safecl.faults import reset as reset_faults

EPILOG_TRAIN = """\
examples:
  safecl train recipes/smoke.yaml                         run every stage
  safecl train recipes/quickstart.yaml --dry-run          show the resolved recipe and stage plan
  safecl train recipe.yaml train.lr=1e-4 stages.1.epochs=2   override keys (dotted path=YAML value)
  safecl train recipe.yaml output_dir=runs/try2 adapter.method=lora
  safecl train recipe.yaml --resume                       continue after a crash, Ctrl-C or SIGKILL
  safecl train recipe.yaml --resume --restart-from gsm8k  retrain a stage (and the later ones) of a run
  safecl train recipe.yaml --num-processes 2              data parallel through accelerate
  safecl train recipe.yaml --from runs/safety-s0:safety   reuse a finished safety stage of another run

overrides: any key of the recipe, list items by index (stages.0.data.limit=64). Values are
parsed as YAML: numbers, true/false, [a, b] lists. `safecl schema` prints every key.
exit codes: 0 done, 2 bad input (the message names file, line and key), 3 the retention gate
halted the run, 130 interrupted (the message names the command that continues it).
Results: <output_dir>/ (see docs/reference/run-directory.md); `safecl audit` reads it. One process
writes a run directory at a time (a second one is refused with exit 2).
"""


def _load(args):
    from safecl.recipe import load_recipe

    overrides = list(args.overrides)
    start = getattr(args, "start_from", None)
    if start:  # RUN_DIR given on the command line resolves against the working directory
        run, _, stage = start.rpartition(":")
        overrides.append(f"start_from={Path(run).resolve()}:{stage}" if run else f"start_from={start}")
    return load_recipe(args.recipe, overrides)


def cmd_validate(args) -> int:
    recipe = _load(args)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: "
          f"{', '.join(f'{s.name} ({s.kind})' for s in recipe.stages)}; method {recipe.adapter.method})")
    return 0


def cmd_schema(args) -> int:
    from safecl.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def cmd_train(args) -> int:
    from safecl.recipe import dump_recipe
    from safecl.recipe.loader import recipe_dir
    from safecl.training.runner import make_plan, run_recipe

    recipe = _load(args)
    if args.dry_run:
        plans, _ = make_plan(recipe, recipe_dir(args.recipe))
        print("# resolved recipe")
        print(dump_recipe(recipe))
        print(f"# stage plan (method {recipe.adapter.method}, rank {recipe.adapter.rank}, output {recipe.output_dir})")
        for p in plans:
            print(p.row())
        return 0
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        rc = relaunch(args)
        run_json = Path(recipe.output_dir) / "run.json"
        if rc != 0 and run_json.is_file() and json.loads(run_json.read_text()).get("status") == "halted":
            return 3  # the launcher reports 1 for any failed worker; the gate's own code is 3
        return rc
    command = train_command(args)
    guard_interrupts()
    try:
        result = run_recipe(recipe, args.recipe, resume=args.resume, restart_from=args.restart_from, command=command)
    except KeyboardInterrupt:
        reset_faults()  # the interrupt is handled: nothing pending
        print(f"\nsafecl: interrupted; committed stages are safe in {recipe.output_dir}. Continue with: {command} --resume",
              file=sys.stderr)
        return 130
    except OSError as exc:
        if not disk_full(exc):
            raise
        print(f"\nsafecl: error: {disk_full_line(exc)}; committed stages are safe in {recipe.output_dir}. Free space "
              f"there, then continue with: {command} --resume", file=sys.stderr)
        return 2
    if result.main:
        print(f"[safecl] run {result.status}: {result.output_dir}")
        print(stage_table(result.output_dir))
    return 0


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(exc: OSError) -> str:
    """``no space left on device writing /runs/x/run.json`` (the file, when the error names one)."""
    what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return f"{what} writing {exc.filename}" if exc.filename else what


def train_command(args) -> str:
    """The user's train command line without --resume/--restart-from (to name in messages)."""
    words = ["safecl", "train", args.recipe, *args.overrides]
    if args.start_from:
        words += ["--from", args.start_from]
    if args.num_processes > 1:
        words += ["--num-processes", str(args.num_processes)]
    if args.accelerate_config:
        words += ["--accelerate-config", args.accelerate_config]
    return shlex.join(words)


def stage_table(out: Path) -> str:
    """The run's R matrix in short (rows: base and every stage; columns: refusal, over-refusal,
    tasks; n per column) and the command for the full audit."""
    from safecl.evaluation.matrix import FILENAME, RetentionMatrix

    path = Path(out) / FILENAME
    audit = f"full audit: safecl audit {out} --report {Path(out) / 'report'}"
    if not path.is_file():
        return audit
    m = RetentionMatrix.load(path)
    cols = m.columns
    rows = [["after", *(c.removeprefix("task:") for c in cols), "retention"]]
    for row in m.rows:
        cells = [("-" if row["scores"].get(c) is None else f"{row['scores'][c]:.2f}") for c in cols]
        ret = m.safety_retention(row["stage"]) if row["stage"] not in ("base", m.safety_stage) else None
        mark = " (rolled back)" if row.get("rolled_back") else ""
        rows.append([row["stage"] + mark, *cells, "-" if ret is None else f"{ret:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    from safecl.audit.table import format_learning

    learned = format_learning({c: e for c, e in m.learning().items() if e.get("gain") is not None})
    timing = time_line(Path(out))
    return "\n".join(["[safecl] refusal (harmful prompts refused), over_refusal (benign prompts refused), "
                      "task scores (nll: gold-answer NLL, lower is better), after each stage:",
                      *("  " + x for x in lines), *(["[safecl] " + learned[0].strip(), learned[1]] if learned else []),
                      *([timing] if timing else []), f"[safecl] {audit}"])


def time_line(out: Path) -> str | None:
    """``[safecl] time: base check 41 s | safety 180 + 40 s | ... | wall 9m 12s``: each stage's
    training and retention-check seconds (run.json) and the run's wall time from its start
    (this process's start for a resumed run is not separated: the wall spans every attempt)."""
    from datetime import datetime

    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    parts = []
    try:
        seconds = json.loads((out / "base_check.json").read_text())["seconds"]
        copied = (run.get("started_from") or {}).get("retention_rows") == "copied"
        parts.append("base check copied" if copied else f"base check {seconds:.0f} s")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for st in run.get("stages", []):
        if st.get("adopted_from"):
            parts.append(f"{st['name']} (from {Path(st['adopted_from']).name})")
            continue
        train, check = st.get("train_seconds"), st.get("check_seconds")
        if train is not None:
            parts.append(f"{st['name']} {train:.0f} s train" + (f" + {check:.0f} s check" if check is not None else ""))
    try:
        start, end = (datetime.fromisoformat(run[k]) for k in ("started", "ended"))
        wall = (end - start).total_seconds()
        parts.append(f"wall {int(wall // 60)}m {int(wall % 60):02d}s" + (" over several attempts" if run.get("resumed") else ""))
    except (KeyError, TypeError, ValueError):
        pass
    return "[safecl] time: " + " | ".join(parts) if parts else None


def relaunch(args) -> int:
    """Re-run this command under ``accelerate launch`` with N processes (DDP; on CPU, gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes)]
    if args.accelerate_config:
        from safecl.training.sharding import check_accelerate_config

        check_accelerate_config(args.accelerate_config)
        cmd += ["--config_file", args.accelerate_config]
    else:
        cmd += ["--multi_gpu"]  # DDP; accelerate falls back to gloo on CPU-only machines
    cmd += ["-m", "safecl", "train", args.recipe, *args.overrides]
    if args.start_from:
        cmd += ["--from", args.start_from]
    if args.resume:
        cmd.append("--resume")
    if args.restart_from:
        cmd += ["--restart-from", args.restart_from]
    print(f"[safecl] relaunching: {' '.join(cmd[2:])}", flush=True)
    # A Ctrl-C or SIGTERM that reaches only this process (kill -INT PID, a scheduler) is passed to
    # the launcher, which ends its workers; this process waits for it (subprocess.call would
    # return at once and leave the workers running).
    launcher = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: launcher.send_signal(signal.SIGTERM))
    interrupted = False
    try:
        while True:
            try:
                rc = launcher.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
                launcher.send_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        print(f"\nsafecl: interrupted; committed stages are safe. Continue with: {train_command(args)} --resume",
              file=sys.stderr)
        return 130
    return rc


def cmd_data_list(args) -> int:
    from safecl.data.catalog import catalog, format_catalog

    rows = catalog()  # built-in sets, then presets for public data sets
    print(json.dumps(rows, indent=2) if args.json else format_catalog(rows))
    return 0


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safecl",
        description="Continual-learning safety for LLM fine-tuning: a safety stage, then task stages, each on "
        "its own LoRI adapter entries, with a safety-retention check after every stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: safecl train recipes/smoke.yaml   (a tiny model, under a minute on CPU)",
    )
    parser.add_argument("--version", action="version", version=f"safecl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_cmd(name, help_, func, epilog=None):
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys (dotted paths)")
        p.set_defaults(func=func)
        return p

    t = recipe_cmd("train", "Run every stage of a recipe (safety first, then tasks).", cmd_train, EPILOG_TRAIN)
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stage plan; train nothing")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir: completed stages are kept, an interrupted stage continues "
                   "from its last checkpoint (train.checkpoint_every); only eval settings may have changed")
    t.add_argument("--restart-from", metavar="STAGE",
                   help="with --resume: train STAGE and every later stage again (earlier stages stay as committed); "
                   "what to run when a committed file of STAGE is damaged")
    t.add_argument("--from", dest="start_from", metavar="RUN_DIR:STAGE",
                   help="start from a finished stage of another run (its adapter, masks, retention rows): the "
                   "recipe's stages up to STAGE must match that run's; training goes on with the next stage")
    t.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="re-launch through `accelerate launch` with N processes (data parallel); same as running "
                   "`accelerate launch --num_processes N -m safecl train ...` yourself")
    t.add_argument("--accelerate-config", metavar="FILE",
                   help="accelerate config file for --num-processes (FSDP, DeepSpeed, multi-node); "
                   "see accelerate_configs/")
    recipe_cmd("validate", "Check a recipe (keys, types, files, mask capacity) without running it.", cmd_validate)
    s = sub.add_parser("schema", help="Print the recipe's JSON schema (every key, type and default).")
    s.set_defaults(func=cmd_schema)
    from safecl.audit.cli import HELP as AUDIT_HELP, configure_audit_parser

    au = sub.add_parser("audit", help=AUDIT_HELP, description=AUDIT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_audit_parser(au)
    mg = sub.add_parser("merge", help="Merge PEFT LoRA adapters (concat or linear), as in LoRI's merging experiments.")
    cp = sub.add_parser("compact", help="Write a lori-s run in compact form (values + indices; A rebuilt from the seed), "
                        "or expand one back to a PEFT adapter.")
    co = sub.add_parser("compose", help="Write any subset of a lori-s/lori-d run's stages as one PEFT LoRA adapter "
                        "(e.g. safety + one task).")
    ck = sub.add_parser("check", help="The retention check (refusal, over-refusal, task scores) on any model, with or "
                        "without a PEFT LoRA adapter.")
    if argv_command in ("merge", "compact", "compose"):  # these load torch: only when asked for
        from safecl.adapters.compact import configure_compact_parser
        from safecl.adapters.compose import configure_compose_parser
        from safecl.adapters.merge import configure_merge_parser

        configure_merge_parser(mg)
        configure_compact_parser(cp)
        configure_compose_parser(co)
    if argv_command == "check":
        from safecl.audit.check import configure_check_parser

        configure_check_parser(ck)
    d = sub.add_parser("data", help="Data sets safecl knows by name.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="List the built-in data sets with their splits, sizes and licenses.")
    dl.add_argument("--json", action="store_true", help="machine-readable output")
    dl.set_defaults(func=cmd_data_list)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line as ``main`` runs it; KEY=VALUE overrides may come after options
    (safecl train r.yaml --dry-run train.lr=1e-4)."""
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except SafeclError as exc:
        print(f"safecl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if not disk_full(exc):
            raise
        again = shlex.join(["safecl", *argv])
        print(f"safecl: error: {disk_full_line(exc)}. Free space there, then run again: {again}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safecl: interrupted; completed stages are in the run directory", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `safecl audit ... | head`: the reader left; say nothing
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout again at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
