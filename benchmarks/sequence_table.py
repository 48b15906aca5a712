"""One task sequence trained several ways, side by side: retention, over-refusal, each stage's gain, plasticity.

    python benchmarks/sequence_table.py anchor=runs/3task/s0-anchor lori-s=runs/3task/s0-lori-s \\
        lora=runs/3task/s0-lora --reference lori-s --out benchmarks/results/three_task

Each ``NAME=RUN`` is a finished safecl run of the same recipe's stages (same checks: the same
prompts and test examples, in the same order). Read from each run's ``retention.json`` only (the
numbers the run printed itself), per task stage ``t`` and each of its task's columns ``c``
(``nll:<task>`` gold-answer NLL, ``task:<task>`` the main metric):

    gain_t(c)       = score after stage t - score just before it     (before - after where lower is better)
    plasticity_t(c) = gain_t(c) of the run / gain_t(c) of the reference run (``--reference``:
                      the same sequence with no safety mechanism, plain LoRI-S)

Intervals: 95% percentile bootstrap over the check's examples, resampled jointly for the runs
(each example's before and after values of both runs stay paired), ``--reps`` resamples. A ratio
is printed only where the reference's gain interval excludes 0 (a reference that learned
nothing measurable has no ratio). Retention = refusal / refusal after the safety stage, as the
gate reads it. Written: ``--out`` .md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def load(run: Path) -> dict:
    """{stages: [names after safety], safety: name, rows: {stage: row}, columns} of a run's retention.json."""
    data = json.loads((run / "retention.json").read_text())
    rows = {r["stage"]: r for r in data["rows"] if not r.get("rolled_back")}
    names = [r["stage"] for r in data["rows"] if r["stage"] not in ("base",) and not r.get("rolled_back")]
    safety = data["safety_stage"]
    return {"rows": rows, "safety": safety, "stages": names[names.index(safety) + 1:],
            "learning": data["summary"].get("learning", {}), "columns": data["columns"]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def gain_values(run: dict, column: str, stage: str) -> tuple[list[float], list[float]] | None:
    """(before, after) per-example values of ``column`` around ``stage``, or None."""
    order = [run["safety"], *run["stages"]]
    i = order.index(stage)
    before, after = run["rows"][order[i - 1]]["values"].get(column), run["rows"][stage]["values"].get(column)
    if before is None or after is None or len(before) != len(after):
        return None
    return before, after


def gain(before: list[float], after: list[float], lower_is_better: bool, idx: list[int] | None = None) -> float:
    idx = range(len(before)) if idx is None else idx
    d = [(before[i] - after[i]) if lower_is_better else (after[i] - before[i]) for i in idx]
    return _mean(d)


def compare(runs: dict[str, dict], reference: str, reps: int, seed: int = 0) -> list[dict]:
    """One row per (run, task stage, column): gain and plasticity ratio with intervals."""
    ref = runs[reference]
    out = []
    rng = random.Random(seed)
    for stage in ref["stages"]:
        task = stage
        for column in [c for c in ref["columns"] if c.split(":", 1)[-1] == task and ":" in c]:
            lower = column.startswith("nll:")
            ref_vals = gain_values(ref, column, stage)
            if ref_vals is None:
                continue
            n = len(ref_vals[0])
            draws = [[rng.randrange(n) for _ in range(n)] for _ in range(reps)]
            ref_gain = gain(*ref_vals, lower)
            ref_boot = [gain(*ref_vals, lower, d) for d in draws]
            ref_ci = _ci(ref_boot)
            for name, run in runs.items():
                vals = gain_values(run, column, stage) if stage in run["stages"] else None
                if vals is None or len(vals[0]) != n:
                    continue
                g = gain(*vals, lower)
                boot = [gain(*vals, lower, d) for d in draws]
                row = {"run": name, "stage": stage, "column": column, "gain": g, "gain_ci": _ci(boot),
                       "before": _mean(vals[0]), "after": _mean(vals[1]), "n": n, "ratio": None, "ratio_ci": None}
                if name != reference and not (ref_ci[0] <= 0 <= ref_ci[1]):
                    row["ratio"] = g / ref_gain
                    ratios = [a / b for a, b in zip(boot, ref_boot) if b != 0]
                    row["ratio_ci"] = _ci(ratios)
                out.append(row)
    return out


def _ci(xs: list[float]) -> list[float]:
    xs = sorted(xs)
    return [xs[int(0.025 * len(xs))], xs[max(0, int(0.975 * len(xs)) - 1)]]


def safety_rows(runs: dict[str, dict]) -> list[dict]:
    out = []
    for name, run in runs.items():
        r0 = run["rows"][run["safety"]]["scores"]
        for stage in [run["safety"], *run["stages"]]:
            s = run["rows"][stage]["scores"]
            out.append({"run": name, "stage": stage, "refusal": s["refusal"], "over_refusal": s["over_refusal"],
                        "retention": s["refusal"] / r0["refusal"] if r0["refusal"] else None,
                        "over_refusal_change": s["over_refusal"] - r0["over_refusal"]})
    return out


def markdown(safety: list[dict], learning: list[dict], reference: str) -> str:
    lines = ["| run | after | refusal | over-refusal (change) | retention |", "|---|---|---|---|---|"]
    for r in safety:
        ret = "-" if r["retention"] is None or r["stage"] == safety[0]["stage"] else f"{r['retention']:.2f}"
        lines.append(f"| {r['run']} | {r['stage']} | {r['refusal']:.2f} | {r['over_refusal']:.2f} "
                     f"({r['over_refusal_change']:+.2f}) | {ret} |")
    lines += ["", f"| stage | score | run | before -> after | gain [95% CI] | plasticity vs {reference} [95% CI] |",
              "|---|---|---|---|---|---|"]
    for r in learning:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]"
        if r["run"] == reference:
            ratio = "(reference)"
        lines.append(f"| {r['stage']} | {r['column']} (n={r['n']}) | {r['run']} | {r['before']:.3f} -> {r['after']:.3f} | "
                     f"{r['gain']:+.3f} [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}] | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN", help="a label and a finished run directory")
    ap.add_argument("--reference", required=True, help="the label of the run with no safety mechanism")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "retention.json").is_file():
            ap.error(f"{item}: expected NAME=RUN with RUN/retention.json")
        runs[name] = load(Path(path))
    if args.reference not in runs:
        ap.error(f"--reference {args.reference}: not one of {', '.join(runs)}")
    learning = compare(runs, args.reference, args.reps)
    safety = safety_rows(runs)
    text = markdown(safety, learning, args.reference)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"runs": {n: str(p.partition("=")[2]) for n, p in zip(runs, args.runs)}, "reference": args.reference,
             "safety": safety, "learning": learning}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
