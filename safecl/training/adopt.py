"""Start a run from a finished stage of another run (``start_from: RUN_DIR:STAGE`` or
``safecl train --from RUN_DIR:STAGE``), so one safety stage serves many task sequences.

The source run's stages up to and including STAGE are adopted: their stage directories
(adapter, mask, metrics, refusal direction) are copied into the new run, their run.json
entries and retention rows (with the base row) are carried over when the retention check is
configured identically and the recipes score the same task evals (``retention.probe`` aside: the
probe judges nothing, and its reference is measured again when it differs); otherwise the base
and adopted stages' rows are measured again. The new run continues with its next stage as a
resumed run would.

Checked before anything is copied (each mismatch is an error naming the key): the source
finished STAGE (not rolled back); the model, adapter and seed settings are equal; each adopted
stage has the same name, kind, data and training settings in both recipes (eval settings may
differ). Recorded in run.json as ``started_from`` and shown by the audit.

Interrupted while it copies (Ctrl-C, SIGKILL, a full disk): each stage folder is copied into a
temporary sibling and renamed into place whole (every file passes the fault point
``adopt.copy``), and nothing is committed before run.json records the adopted stages; the next
command (the same one, with or without ``--resume``) copies again and goes on, ending as an
uninterrupted run would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from safecl.atomic import atomic_directory, atomic_file
from safecl.config import resolve_source
from safecl.errors import TrainingError
from safecl.faults import fault_point
from safecl.evaluation.answers import BASE_ANSWERS
from safecl.evaluation.matrix import BASE, FILENAME, RetentionMatrix
from safecl.recipe.base import flatten_keys
from safecl.recipe.schema import Recipe
from safecl.integrity import verify_stage
from safecl.training.rundir import read_json, write_json

# keys of an adopted stage that may differ between the two recipes
_STAGE_FREE = ("eval", "replay", "anchor", "merge")


def parse_start(spec: str, base_dir: Path) -> tuple[Path, str]:
    run, sep, stage = spec.rpartition(":")
    if not sep or not run or not stage:
        raise TrainingError(f"start_from {spec!r}: expected RUN_DIR:STAGE (e.g. runs/safety-s0:safety)")
    return resolve_source(run, base_dir).resolve(), stage


def _compare(source: dict, recipe: dict, keys: list[str]) -> list[str]:
    a, b = flatten_keys(source), flatten_keys(recipe)
    out = []
    for prefix in keys:
        for k in sorted(set(a) | set(b)):
            if (k == prefix or k.startswith(prefix + ".")) and a.get(k, "<unset>") != b.get(k, "<unset>"):
                out.append(f"{k}: {a.get(k, '<unset>')!r} in the source, {b.get(k, '<unset>')!r} here")
    return out


def adopt_stages(recipe: Recipe, base_dir: Path, out: Path) -> dict:
    """Copy the source run's stages into ``out``; returns the ``started_from`` record."""
    src, stage_name = parse_start(recipe.start_from, base_dir)
    if not (src / "run.json").is_file() or not (src / "recipe.resolved.yaml").is_file():
        raise TrainingError(f"start_from: {src} is not a safecl run directory (no run.json / recipe.resolved.yaml)")
    run = read_json(src / "run.json")
    finished = [s for s in run.get("stages", []) if not s.get("rolled_back")]
    names = [s["name"] for s in finished]
    if stage_name not in names:
        raise TrainingError(f"start_from: stage {stage_name!r} is not a finished stage of {src} "
                            f"(finished: {', '.join(names) or 'none'})")
    k = names.index(stage_name)
    try:  # through today's schema, so keys added since the source ran compare at their defaults
        source = Recipe.model_validate(yaml.safe_load((src / "recipe.resolved.yaml").read_text(encoding="utf-8")))
    except ValueError as exc:
        raise TrainingError(f"start_from: {src}/recipe.resolved.yaml no longer validates: {exc}") from None
    source = source.model_dump(mode="json")
    mine = recipe.model_dump(mode="json")
    if k >= len(recipe.stages) - 1:
        raise TrainingError(f"start_from: stage {stage_name!r} is stage {k} and this recipe has no stage after it")
    diffs = [d for d in _compare(source, mine, ["model", "adapter", "seed"])
             if not d.startswith("adapter.allocation")]  # only chooses later stages' masks
    for i in range(k + 1):
        s_stage = {key: v for key, v in source["stages"][i].items() if key not in _STAGE_FREE}
        m_stage = {key: v for key, v in mine["stages"][i].items() if key not in _STAGE_FREE}
        diffs += [f"stages.{i}.{d}" for d in _compare(s_stage, m_stage, list(m_stage) + list(s_stage))]
    if diffs:
        raise TrainingError(f"start_from {src}:{stage_name}: the runs differ where they must agree: "
                            + "; ".join(sorted(set(diffs))[:8]))
    for entry in finished[:k + 1]:
        verify_stage(src / entry["dir"], entry, f"rerun that stage in {src} (safecl train ... --resume --restart-from "
                                                f"{entry['name']})")
        with atomic_directory(out / entry["dir"]) as tmp:
            shutil.copytree(src / entry["dir"], tmp, ignore=shutil.ignore_patterns("checkpoint"),
                            copy_function=_copy_file, dirs_exist_ok=True)
    # rows are copied only when this run's check would judge and score exactly what the source's did:
    # the same retention settings (the probe aside: it judges nothing, and its reference is re-measured
    # on its own when outdated) and the same task evals (a check scores every task of its recipe)
    same_check = (_judged_settings(source) == _judged_settings(mine)
                  and _task_evals(source) == _task_evals(mine))
    if same_check and (src / FILENAME).is_file():
        old = RetentionMatrix.load(src / FILENAME)
        keep = RetentionMatrix(safety_stage=recipe.stages[0].name)
        keep.rows = [r for r in old.rows if r["stage"] in {BASE, *names[:k + 1]}]
        keep.save(out / FILENAME)
        for name in ("base_check.json", BASE_ANSWERS):  # the base row's n, interval and answers
            if (src / name).is_file():
                with atomic_file(out / name) as tmp:
                    _copy_file(src / name, tmp)
    return {"run": str(src), "stage": stage_name, "stages": names[:k + 1],
            "retention_rows": "copied" if same_check else "re-measured (retention settings or task evals differ)",
            "entries": finished[:k + 1]}


def _judged_settings(recipe: dict) -> dict:
    """The ``retention`` section less ``probe``: what the base and safety rows were judged with."""
    return {k: v for k, v in (recipe.get("retention") or {}).items() if k != "probe"}


def _task_evals(recipe: dict) -> list:
    """(stage name, eval settings) of every stage that has an eval: what a check scores as tasks."""
    return [(st["name"], st.get("eval")) for st in recipe.get("stages", []) if st.get("eval")]


def _copy_file(source, target):
    fault_point("adopt.copy", target)
    return shutil.copy2(source, target)


def write_adopted(out: Path, run_info: dict, started: dict) -> None:
    run_info["started_from"] = {k: v for k, v in started.items() if k != "entries"}
    run_info["stages"] = [dict(e, adopted_from=started["run"]) for e in started["entries"]]
    write_json(out / "run.json", run_info)
