"""Which mechanism keeps the safety alignment through a task stage, and at what cost?

Runs recipes/smollm2-saferpaca-gsm8k.yaml (SmolLM2-135M-Instruct, Saferpaca safety stage ->
GSM8K) with the retention check enlarged to >= 128 prompts per set, for LoRA, LoRI-S as it
was, and LoRI-S with each safety-keeping mechanism, over several seeds. One safety stage per
seed (the full LoRI-S run) serves every LoRI-S configuration of that seed through
``safecl train --from RUN:safety``, so a configuration costs a task stage and one check.

Every configuration is a real ``safecl train`` process writing a normal run directory under
``--runs``; a finished one is not run again (the study resumes where it stopped). After every
configuration the table is rewritten: ``--out``.json (every number with n and its 95%
bootstrap interval, costs) and ``--out``.md (the table the README shows).

Learning: every check scores GSM8K (``retention.score_all_tasks``), so the task stage's gain is
measured from the same safety stage, by gold-answer NLL on the 128 test problems (moves at
135M) and by exact match; plasticity ratio = a configuration's gain / plain LoRI-S's gain, same
seed (1 = the mechanism costs no learning). LoRA without a mechanism is the ceiling row.

    python benchmarks/safety_study.py --seeds 0 1 --configs lori-s anchor-kl replay-10 lora
    python benchmarks/safety_study.py --list          # the configurations and their overrides
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-saferpaca-gsm8k.yaml"
# the enlarged check: 128 AdvBench behaviours, 128 XSTest safe prompts, 128 GSM8K test problems
CHECK = ["retention.harmful.limit=128", "retention.benign.limit=128", "stages.1.eval.limit=128"]
# What each configuration changes in the recipe (the recipe's own settings otherwise). The
# shipped recipe may already carry a mechanism: "lori-s" removes them all, to measure LoRI-S as it was.
PLAIN = ["stages.1.anchor=null", "stages.1.replay=null", "stages.1.merge=null", "adapter.allocation=magnitude"]
CONFIGS: dict[str, list[str]] = {
    "lori-s": PLAIN,
    "lora": PLAIN + ["adapter.method=lora", "train.lr=3e-4"],
    "replay-5": PLAIN + ["stages.1.replay={share: 0.05}"],
    "replay-10": PLAIN + ["stages.1.replay={share: 0.10}"],
    "replay-25": PLAIN + ["stages.1.replay={share: 0.25}"],
    "replay-10-distill": PLAIN + ["stages.1.replay={share: 0.10, distill: 1.0}"],
    "anchor-kl": PLAIN + ["stages.1.anchor={loss: kl, weight: 1.0}"],
    "anchor-kl-w4": PLAIN + ["stages.1.anchor={loss: kl, weight: 4.0}"],
    "anchor-kl-every4": PLAIN + ["stages.1.anchor={loss: kl, weight: 1.0, every: 4}"],
    "anchor-direction": PLAIN + ["stages.1.anchor={loss: direction, weight: 1.0}"],
    "merge": PLAIN + ["stages.1.merge={threshold: 0.0, scale: 0.5}"],
    "safety-aware": PLAIN + ["adapter.allocation=safety-aware"],
    "anchor-kl+replay-10": PLAIN + ["stages.1.anchor={loss: kl, weight: 1.0}", "stages.1.replay={share: 0.10}"],
    "anchor-kl+safety-aware": PLAIN + ["stages.1.anchor={loss: kl, weight: 1.0}", "adapter.allocation=safety-aware"],
}
FULL_RUN = {"lori-s", "lora"}  # these train their own safety stage


def run_dir(runs: Path, seed: int, name: str) -> Path:
    return runs / f"s{seed}-{name}"


def finished(path: Path) -> bool:
    info = path / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "completed"


def train(runs: Path, seed: int, name: str, log) -> Path:
    out = run_dir(runs, seed, name)
    if finished(out):
        return out
    cmd = [sys.executable, "-m", "safecl", "train", str(RECIPE), *CHECK, *CONFIGS[name], f"seed={seed}",
           f"output_dir={out}"]
    if name not in FULL_RUN:
        base = run_dir(runs, seed, "lori-s")
        if not finished(base):
            train(runs, seed, "lori-s", log)
        cmd += ["--from", f"{base}:safety"]
    resume = (out / "run.json").is_file()
    if resume:
        cmd.append("--resume")
    log(f"$ {' '.join(cmd[1:])}")
    start = time.perf_counter()
    with open(runs / f"s{seed}-{name}.log", "a") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    log(f"  {name} seed {seed}: exit {rc} after {time.perf_counter() - start:.0f}s")
    if rc != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {rc}); see {runs}/s{seed}-{name}.log")
    return out


def _cell(row: dict, column: str) -> dict | None:
    for e in row["evals"]:
        if e["name"] == column:
            return {"score": e["score"], "n": e["n"], "ci": e.get("ci")}
    return None


def collect(out: Path) -> dict:
    """Numbers of one run: after safety and after the task stage, with n and intervals, and costs."""
    stages = sorted((out / "stages").iterdir())
    safety, task = (json.loads((d / "metrics.json").read_text()) for d in (stages[0], stages[-1]))
    s_ret, t_ret = safety["retention"], task["retention"]
    refusal_s = _cell(s_ret, "refusal")
    refusal_t = _cell(t_ret, "refusal")
    terms = {k: {kk: vv for kk, vv in v.items() if kk != "values"} for k, v in task["train"].get("terms", {}).items()}
    mech = task.get("mechanisms", {})
    learning = {}
    matrix = out / "retention.json"
    if matrix.is_file():
        learned = json.loads(matrix.read_text())["summary"].get("learning", {})
        for column, entry in learned.items():
            kind = "nll" if column.startswith("nll:") else "em"
            learning[kind] = {k: entry.get(k) for k in ("base", "before", "after", "gain", "gain_ci")}
    return {
        "run": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "refusal_after_safety": refusal_s, "over_refusal_after_safety": _cell(s_ret, "over_refusal"),
        "refusal": refusal_t, "over_refusal": _cell(t_ret, "over_refusal"),
        "gsm8k": next((_cell(t_ret, e["name"]) for e in t_ret["evals"] if e["name"].startswith("task:")), None),
        "retention": refusal_t["score"] / refusal_s["score"] if refusal_s and refusal_s["score"] else None,
        "task_train_seconds": task["train"]["seconds"] + task.get("calibration", {}).get("seconds", 0.0),
        "task_steps": task["train"]["steps"],
        "check_seconds": t_ret.get("seconds"),
        "terms": terms,
        "mechanisms": {k: {kk: vv for kk, vv in v.items() if kk != "scaled_modules"} if isinstance(v, dict) else v
                       for k, v in mech.items()},
        "learning": learning,
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt(cell: dict | None) -> str:
    if not cell:
        return "-"
    lo, hi = (cell.get("ci") or [None, None])[:2]
    band = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
    return f"{cell['score']:.2f}{band} (n={cell['n']})"


def write_table(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| configuration | seed | refusal after safety | refusal after GSM8K | retention | over-refusal after "
             "safety | over-refusal after GSM8K | GSM8K exact match | task stage s | extra s/step | check s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results.items(), key=lambda kv: (list(CONFIGS).index(kv[1]["config"]), kv[1]["seed"])):
        extra = sum(t.get("seconds_per_step") or 0 for t in r["terms"].values())
        lines.append(f"| {r['config']} | {r['seed']} | {_fmt(r['refusal_after_safety'])} | {_fmt(r['refusal'])} | "
                     f"{_num(r['retention'])} | {_fmt(r['over_refusal_after_safety'])} | {_fmt(r['over_refusal'])} | "
                     f"{_fmt(r['gsm8k'])} | {r['task_train_seconds']:.0f} | {extra:.2f} | "
                     f"{r['check_seconds'] or 0:.0f} |")
    lines += ["", "| configuration | seeds | retention mean (min-max) | refusal after GSM8K | over-refusal change "
              "(after GSM8K - after safety) | GSM8K exact match | GSM8K NLL gain | plasticity (NLL) | extra s/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        rs = [r for r in results.values() if r["config"] == name]
        if not rs:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        ret = [r["retention"] for r in rs if r["retention"] is not None]
        change = [r["over_refusal"]["score"] - r["over_refusal_after_safety"]["score"] for r in rs]
        extra = [sum(t.get("seconds_per_step") or 0 for t in r["terms"].values()) for r in rs]
        gains = [g for r in rs if (g := _gain(r, "nll")) is not None]
        ratios = [g / g0 for r in rs if (g := _gain(r, "nll")) is not None
                  and (g0 := _gain(results.get(f"lori-s/s{r['seed']}", {}), "nll"))]
        lines.append(f"| {name} | {len(rs)} | {mean(ret):.2f} ({min(ret):.2f}-{max(ret):.2f}) | "
                     f"{mean([r['refusal']['score'] for r in rs]):.2f} | {mean(change):+.2f} | "
                     f"{mean([r['gsm8k']['score'] for r in rs]):.3f} | "
                     f"{f'{mean(gains):+.3f}' if gains else '-'} | {f'{mean(ratios):.2f}' if ratios else '-'} | "
                     f"{mean(extra):.2f} |")
    lines += learning_table(results)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _gain(r: dict, kind: str) -> float | None:
    return (r.get("learning", {}).get(kind) or {}).get("gain")


def _gain_cell(r: dict, kind: str, digits: int) -> str:
    entry = r.get("learning", {}).get(kind) or {}
    if entry.get("gain") is None:
        return "-"
    ci = entry.get("gain_ci")
    band = f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else ""
    return f"{entry['gain']:+.{digits}f}{band}"


def learning_table(results: dict) -> list[str]:
    """Per run: the GSM8K stage's gain (gold-answer NLL: before - after, nats per token; exact
    match: after - before) with paired 95% intervals, and the plasticity ratio = that gain / the
    same seed's plain LoRI-S gain from the same safety stage (runs measured before the gain
    existed have none)."""
    rows = [r for r in results.values() if r.get("learning")]
    if not rows:
        return []
    lines = ["", "| configuration | seed | GSM8K NLL after safety | NLL gain [95% CI] | plasticity (NLL) | "
             "exact-match gain [95% CI] | plasticity (exact match) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(CONFIGS).index(r["config"]), r["seed"])):
        ref = results.get(f"lori-s/s{r['seed']}", {})
        ratio = []
        for kind in ("nll", "em"):
            g, g0 = _gain(r, kind), _gain(ref, kind)
            ci0 = (ref.get("learning", {}).get(kind) or {}).get("gain_ci")
            if ci0 and ci0[0] <= 0 <= ci0[1]:  # the reference learned nothing measurable: no ratio
                ratio.append("n/a (reference gain's CI spans 0)")
            else:
                ratio.append("-" if g is None or not g0 else f"{g / g0:.2f}")
        before = (r["learning"].get("nll") or {}).get("before")
        lines.append(f"| {r['config']} | {r['seed']} | {_num(before)} | {_gain_cell(r, 'nll', 3)} | {ratio[0]} | "
                     f"{_gain_cell(r, 'em', 3)} | {ratio[1]} |")
    return lines


def rewrite(out: Path) -> None:
    """Rewrite the .md from the .json (after a change of this script's table)."""
    write_table(json.loads(out.with_suffix(".json").read_text()), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", nargs="+", default=["lori-s", "anchor-kl", "replay-10", "lora"],
                    choices=list(CONFIGS), metavar="NAME")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "safety_study")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument("--table-only", action="store_true", help="rewrite the .md table from the .json and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, over in CONFIGS.items():
            print(f"{name:<24} {' '.join(over)}")
        return 0
    if args.table_only:
        rewrite(args.out)
        return 0
    args.runs.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    for name in args.configs:  # configuration-major: every seed of the first config before the next
        for seed in args.seeds:
            out = train(args.runs, seed, name, log)
            results[f"{name}/s{seed}"] = {"config": name, "seed": seed, **collect(out)}
            write_table(results, args.out)
            r = results[f"{name}/s{seed}"]
            log(f"  {name} s{seed}: refusal {_fmt(r['refusal'])}, retention {_num(r['retention'])}, "
                f"over-refusal {_fmt(r['over_refusal'])}, gsm8k {_fmt(r['gsm8k'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
