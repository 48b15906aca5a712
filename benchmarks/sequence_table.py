"""One task sequence trained several ways, side by side: retention, over-refusal, each stage's gain, plasticity.

    python benchmarks/sequence_table.py anchor=runs/3task/s0-anchor lori-s=runs/3task/s0-lori-s \\
        lora=runs/3task/s0-lora --reference lori-s --out benchmarks/results/three_task
    python benchmarks/sequence_table.py anchor=runs/3task/s0-anchor,runs/3task/s1-anchor \\
        lori-s=runs/3task/s0-lori-s,runs/3task/s1-lori-s --reference lori-s     # two seeds

Each ``NAME=RUN`` is a finished safecl run of the same recipe's stages (same checks: the same
prompts and test examples, in the same order). Read from each run's ``retention.json`` only (the
numbers the run printed itself), per task stage ``t`` and each of its task's columns ``c``
(``nll:<task>`` gold-answer NLL, ``task:<task>`` the main metric):

    gain_t(c)       = score after stage t - score just before it     (before - after where lower is better)
    plasticity_t(c) = gain_t(c) of the run / gain_t(c) of the reference run (``--reference``:
                      the same sequence with no safety mechanism, plain LoRI-S)

Intervals: 95% percentile bootstrap over the check's examples, resampled jointly for the runs
(each example's before and after values of both runs stay paired), ``--reps`` resamples. A ratio
is printed only where the reference's gain interval lies above 0 (a reference that learned
nothing measurable, or lost ground, has no ratio: a ratio of two losses reads backwards). Retention = refusal / refusal after the safety stage, as the
gate reads it. Written: ``--out`` .md and .json.

Seeds: ``NAME=RUN0,RUN1,...`` lists one run per seed; the k-th run of every name is compared with
the k-th run of the reference (the same seed's plain run, from the same safety stage), and a first
table gives, per name and stage, the mean over seeds and each seed's value (retention,
over-refusal, each column's gain and plasticity ratio). Every name lists the same number of runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml


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
                if name != reference and ref_ci[0] > 0:
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


def seed_summary(safety: list[dict], learning: list[dict], reference: str) -> list[dict]:
    """Per (run, stage) over seeds: retention and over-refusal; per (run, stage, column): gain and
    plasticity ratio. Each entry: the mean and the per-seed values (seed order of the command)."""
    out = []
    keys = list(dict.fromkeys((r["run"], r["stage"]) for r in safety))
    for name, stage in keys:
        rows = [r for r in safety if (r["run"], r["stage"]) == (name, stage)]
        out.append({"run": name, "stage": stage, "what": "retention",
                    "seeds": [r["retention"] for r in rows], "over_refusal": [r["over_refusal"] for r in rows]})
    keys = list(dict.fromkeys((r["run"], r["stage"], r["column"]) for r in learning))
    for name, stage, column in keys:
        rows = [r for r in learning if (r["run"], r["stage"], r["column"]) == (name, stage, column)]
        out.append({"run": name, "stage": stage, "what": column, "gain": [r["gain"] for r in rows],
                    "ratio": None if name == reference else [r["ratio"] for r in rows],
                    "ratio_ci": None if name == reference else [r["ratio_ci"] for r in rows]})
    for e in out:
        for k in ("seeds", "over_refusal", "gain", "ratio"):
            vals = e.get(k)
            if vals and all(v is not None for v in vals):
                e[f"{k}_mean"] = _mean(vals)
    return out


def _seeds(vals: list | None, fmt: str) -> str:
    if not vals or any(v is None for v in vals):
        return "-"
    mean = format(_mean(vals), fmt)
    return mean if len(vals) == 1 else f"{mean} ({' / '.join(format(v, fmt) for v in vals)})"


def seed_markdown(summary: list[dict], reference: str, n_seeds: int) -> str:
    """Mean over the seeds, each seed's value in brackets."""
    safety = [e for e in summary if e["what"] == "retention"]
    lines = [f"Mean over {n_seeds} seeds (each seed's value in brackets):", "",
             "| run | after | retention | over-refusal |", "|---|---|---|---|"]
    first = {}
    for e in safety:
        first.setdefault(e["run"], e["stage"])
        ret = "-" if e["stage"] == first[e["run"]] else _seeds(e["seeds"], ".2f")
        lines.append(f"| {e['run']} | {e['stage']} | {ret} | {_seeds(e['over_refusal'], '.2f')} |")
    lines += ["", f"| stage | score | run | gain | plasticity vs {reference} |", "|---|---|---|---|---|"]
    for e in summary:
        if e["what"] == "retention":
            continue
        ratio = "(reference)" if e["run"] == reference else _seeds(e["ratio"], ".2f")
        lines.append(f"| {e['stage']} | {e['what']} | {e['run']} | {_seeds(e['gain'], '+.3f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def _seed_label(run: str, k: int, n: int) -> str:
    """"Seed S" from the run's recipe.resolved.yaml, else "Run set k+1 of n"."""
    recipe = Path(run) / "recipe.resolved.yaml"
    seed = (yaml.safe_load(recipe.read_text()) or {}).get("seed") if recipe.is_file() else None
    return f"Seed {seed}" if seed is not None else f"Run set {k + 1} of {n}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN", help="a label and a finished run directory")
    ap.add_argument("--reference", required=True, help="the label of the run with no safety mechanism")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    paths: dict[str, list[str]] = {}
    for item in args.runs:
        name, sep, value = item.partition("=")
        listed = value.split(",")
        if not sep or not all((Path(p) / "retention.json").is_file() for p in listed):
            ap.error(f"{item}: expected NAME=RUN[,RUN...] with RUN/retention.json")
        paths[name] = listed
    if args.reference not in paths:
        ap.error(f"--reference {args.reference}: not one of {', '.join(paths)}")
    n_seeds = len(paths[args.reference])
    if any(len(v) != n_seeds for v in paths.values()):
        ap.error(f"every NAME lists {n_seeds} run(s), one per seed, as --reference {args.reference} does")
    safety, learning, parts = [], [], []
    for k in range(n_seeds):
        runs = {name: load(Path(v[k])) for name, v in paths.items()}
        seed_learning = compare(runs, args.reference, args.reps, seed=k)
        seed_safety = safety_rows(runs)
        for r in seed_learning + seed_safety:
            r["seed_index"] = k
        learning += seed_learning
        safety += seed_safety
        title = f"{_seed_label(paths[args.reference][k], k, n_seeds)}: " + ", ".join(
            f"{n} = {v[k]}" for n, v in paths.items())
        parts.append((title + "\n\n" if n_seeds > 1 else "") + markdown(seed_safety, seed_learning, args.reference))
    summary = seed_summary(safety, learning, args.reference)
    text = "\n".join(([seed_markdown(summary, args.reference, n_seeds)] if n_seeds > 1 else []) + parts)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"runs": paths, "reference": args.reference, "seeds": n_seeds, "summary": summary,
             "safety": safety, "learning": learning}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
