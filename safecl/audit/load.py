"""Reading a run directory into a :class:`RunRecord`, whatever state the run is in.

A directory is a run when it holds at least one of ``run.json``, ``recipe.resolved.yaml`` or
``retention.json`` (see docs/reference/run-directory.md). Everything else is optional, because a
run can be read while it trains, after a crash, after the gate halted it or rolled a stage
back:

- ``run.json`` missing or without ``status``: the status is ``"running"`` when
  ``recipe.resolved.yaml`` exists (the runner writes both first), else ``"unknown"``.
- ``retention.json`` missing: the R matrix is rebuilt from ``base_check.json`` and the
  ``retention`` section of every stage's ``metrics.json`` (rows in stage order); when there is
  nothing to rebuild from, ``matrix`` is None.
- a stage directory without ``metrics.json`` (the stage is training) or whose metrics have no
  ``retention`` yet (its check is running): the stage is listed with what is known.
- only committed stages are read: once run.json lists stages, a stage directory without its
  run.json entry (written, not committed: a live run between its files and its commit, or a
  stage left by an interrupt) is listed as started, its files unread, and its row in
  ``retention.json`` is left out; so an audit beside a live run never reads a stage that is
  still being written (files are also written atomically: never half of one).
- stages named in the recipe but not started yet are listed with state ``"pending"``.
- repair passes of the gate (action ``repair``): stages named ``<stage>.repair<k>``, not in the
  recipe, with the index of the stage they repair (``stages/<NN>-<stage>.repair<k>/``, a
  run.json entry with ``repair_of``): listed right after that stage, in attempt order.
- a run started from another run's stage (run.json ``started_from``): its adopted stages carry
  ``adopted_from`` in their run.json entries.

A file that exists but cannot be parsed is not fatal: it is skipped and a warning naming the
path is added to ``RunRecord.warnings``. Only a path that is not a run raises
:class:`NotARunError` (a :class:`~safecl.errors.DataError`, exit code 2), naming the path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from safecl.errors import DataError
from safecl.integrity import verify_run
from safecl.evaluation.matrix import BASE, FILENAME, RetentionMatrix

RUN_MARKERS = ("run.json", "recipe.resolved.yaml", FILENAME)
_STAGE_DIR = re.compile(r"^(\d+)-(.+)$")
_REPAIR = re.compile(r"^(.+)\.repair(\d+)$")


class NotARunError(DataError):
    """The path does not exist or holds none of the files of a safecl run directory."""


@dataclass
class StageRecord:
    """One stage as found on disk.

    ``state``: ``"checked"`` (metrics with a retention check), ``"trained"`` (metrics without a
    check: the check is running, or retention is off), ``"started"`` (a stage directory or a
    run.json entry but no metrics yet), ``"pending"`` (only named in the recipe).
    ``evals`` maps eval-set name (``refusal``, ``over_refusal``, ``task:<name>``) to the check's
    record of it (score, n, ci, measured_by; the per-prompt samples are dropped).
    """

    index: int
    name: str
    kind: str | None = None
    dir: Path | None = None
    metrics: dict | None = None
    run_entry: dict | None = None
    evals: dict[str, dict] = field(default_factory=dict)
    mask_path: Path | None = None

    @property
    def state(self) -> str:
        if self.metrics is not None:
            return "checked" if "retention" in self.metrics else "trained"
        if self.dir is not None or self.run_entry is not None:
            return "started"
        return "pending"

    @property
    def gate(self) -> dict | None:
        return (self.metrics or {}).get("gate")

    @property
    def mask(self) -> dict | None:
        return (self.metrics or {}).get("mask")

    @property
    def rolled_back(self) -> bool:
        return bool((self.metrics or {}).get("rolled_back") or (self.run_entry or {}).get("rolled_back"))

    @property
    def repair_of(self) -> str | None:
        """The stage this one is a gate repair pass of (metrics or run.json ``repair_of``, else
        the ``<stage>.repair<k>`` name); None for a recipe stage."""
        named = _REPAIR.match(self.name)
        return ((self.metrics or {}).get("repair_of") or (self.run_entry or {}).get("repair_of")
                or (named.group(1) if named else None))

    @property
    def attempt(self) -> int | None:
        """The repair pass's number k (1, 2, ...); None for a recipe stage."""
        if self.repair_of is None:
            return None
        named = _REPAIR.match(self.name)
        return (self.metrics or {}).get("attempt") or (int(named.group(2)) if named else None)

    @property
    def adopted_from(self) -> str | None:
        """The run this stage was copied from (run.json entry ``adopted_from``), else None."""
        return (self.run_entry or {}).get("adopted_from")


@dataclass
class RunRecord:
    """Everything the audit needs from one run directory (see the module docstring)."""

    path: Path
    status: str
    run_info: dict
    recipe: dict
    matrix: RetentionMatrix | None
    base_evals: dict[str, dict]
    stages: list[StageRecord]
    warnings: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def method(self) -> str | None:
        return self.run_info.get("method") or (self.recipe.get("adapter") or {}).get("method")

    @property
    def model(self) -> str | None:
        return self.run_info.get("model") or (self.recipe.get("model") or {}).get("name")

    @property
    def started_from(self) -> dict | None:
        """run.json ``started_from`` ({run, stage, stages, retention_rows}) or None."""
        value = self.run_info.get("started_from")
        return value if isinstance(value, dict) else None

    @property
    def gate_config(self) -> dict:
        return dict(self.recipe.get("gate") or {})

    def evals_of(self, checkpoint: str) -> dict[str, dict]:
        """The check records (score, n, ci, ...) of row ``checkpoint`` ({} when unknown)."""
        if checkpoint == BASE:
            return self.base_evals
        return next((s.evals for s in self.stages if s.name == checkpoint), {})


def _read_json(path: Path, warnings: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        warnings.append(f"{path}: cannot read: {err}")
    except json.JSONDecodeError as err:
        warnings.append(f"{path}:{err.lineno}: not valid JSON ({err.msg}); skipped")
    return None


def _read_recipe(path: Path, warnings: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        warnings.append(f"{path}: cannot parse the recipe: {err}; thresholds fall back to defaults")
        return {}
    return data if isinstance(data, dict) else {}


def _evals(check: dict | None) -> dict[str, dict]:
    if not isinstance(check, dict):
        return {}
    out = {}
    for ev in check.get("evals") or []:
        if isinstance(ev, dict) and "name" in ev:
            out[ev["name"]] = {k: v for k, v in ev.items() if k != "samples"}
    return out


def _slot(records: list[StageRecord], index: int, name: str) -> StageRecord:
    """The record of stage ``name`` at ``index``, added when new. A repair pass
    (``<stage>.repair<k>``) gets a record of its own; another name at the index of a known
    non-repair stage is that stage (a renamed stage: the caller decides which name wins)."""
    same = [r for r in records if r.index == index]
    hit = next((r for r in same if r.name == name), None)
    if hit is None and not _REPAIR.match(name):
        hit = next((r for r in same if not _REPAIR.match(r.name)), None)
    if hit is None:
        hit = StageRecord(index, name)
        records.append(hit)
    return hit


def _read_stage_dir(rec: StageRecord, d: Path, warnings: list[str]) -> None:
    """Fill ``rec`` from its stage directory ``d`` (metrics, evals, mask file)."""
    rec.dir = d
    rec.metrics = _read_json(d / "metrics.json", warnings)
    if rec.metrics is not None and not isinstance(rec.metrics, dict):
        warnings.append(f"{d / 'metrics.json'}: not a JSON object; skipped")
        rec.metrics = None
    rec.kind = rec.kind or (rec.metrics or {}).get("kind")
    rec.evals = _evals((rec.metrics or {}).get("retention"))
    for fname in ("mask.safetensors", "mask.rolled_back.safetensors"):
        if (d / fname).is_file():
            rec.mask_path = d / fname
            break


def _stages(root: Path, recipe: dict, run_info: dict, warnings: list[str]) -> list[StageRecord]:
    """Union of recipe stages, run.json entries and stage directories, by index; a stage's
    repair passes follow it, in attempt order."""
    records: list[StageRecord] = []
    for i, st in enumerate(recipe.get("stages") or []):
        if isinstance(st, dict) and st.get("name"):
            records.append(StageRecord(i, str(st["name"]), kind=st.get("kind")))
    for entry in run_info.get("stages") or []:
        if isinstance(entry, dict) and isinstance(entry.get("index"), int):
            rec = _slot(records, entry["index"], str(entry.get("name")))
            rec.run_entry = entry
            rec.kind = rec.kind or entry.get("kind")
    stages_root = root / "stages"
    for d in sorted(stages_root.iterdir()) if stages_root.is_dir() else []:
        hit = _STAGE_DIR.match(d.name)
        if not d.is_dir() or not hit:
            continue
        index, name = int(hit.group(1)), hit.group(2)
        rec = _slot(records, index, name)
        if rec.name != name:
            warnings.append(f"{d}: stage {index} is named {rec.name!r} in the recipe; using the directory")
            rec.name = name
        _read_stage_dir(rec, d, warnings)
    return sorted(records, key=lambda r: (r.index, r.attempt or 0))


def _committed_only(run_info: dict, stages: list[StageRecord]) -> set[str] | None:
    """Forget what was read of stages that run.json does not list (module doc); the committed
    names, or None for a run.json without a stage list (nothing to tell committed by)."""
    entries = run_info.get("stages")
    if not isinstance(entries, list):
        return None
    committed = {str(e.get("name")) for e in entries if isinstance(e, dict)}
    for rec in stages:
        if rec.run_entry is None and rec.dir is not None:
            rec.metrics, rec.evals, rec.mask_path = None, {}, None
    return committed


def _rebuild_matrix(base_evals: dict, stages: list[StageRecord], safety: str | None) -> RetentionMatrix | None:
    """R from base_check.json and the stages' metrics, when retention.json is missing."""
    matrix = RetentionMatrix(safety_stage=safety)
    if base_evals:
        matrix.add_row(BASE, {k: v.get("score") for k, v in base_evals.items()},
                       values={k: v["values"] for k, v in base_evals.items() if v.get("values")})
    for st in stages:
        if st.evals:
            matrix.add_row(st.name, {k: v.get("score") for k, v in st.evals.items()},
                           values={k: v["values"] for k, v in st.evals.items() if v.get("values")})
            if st.rolled_back:
                matrix.mark_rolled_back(st.name)
    return matrix if matrix.rows else None


def load_run(run_dir: str | Path) -> RunRecord:
    """Read ``run_dir`` (see the module docstring for what may be missing).

    Raises:
        NotARunError: ``run_dir`` does not exist, is not a directory or holds no run file.
    """
    root = Path(run_dir)
    if not root.exists():
        raise NotARunError(f"{root}: no such directory")
    if not root.is_dir():
        raise NotARunError(f"{root}: not a directory (give the run's output_dir)")
    if not any((root / m).is_file() for m in RUN_MARKERS):
        raise NotARunError(f"{root}: not a safecl run directory (none of {', '.join(RUN_MARKERS)} in it)")
    warnings: list[str] = []
    run_info = _read_json(root / "run.json", warnings)
    if not isinstance(run_info, dict):
        run_info = {}
    recipe = _read_recipe(root / "recipe.resolved.yaml", warnings)
    stages = _stages(root, recipe, run_info, warnings)
    committed = _committed_only(run_info, stages)
    verify_run(root)  # committed stages: their files as written at commit, or a CorruptStage error
    base_evals = _evals(_read_json(root / "base_check.json", warnings))
    safety = stages[0].name if stages else None
    matrix = None
    raw = _read_json(root / FILENAME, warnings)
    if raw is not None:
        try:
            matrix = RetentionMatrix.from_dict(raw, origin=str(root / FILENAME))
        except DataError as err:
            warnings.append(f"{err}; rebuilt from the stages' metrics.json")
    if matrix is None:
        matrix = _rebuild_matrix(base_evals, stages, safety)
    if matrix is not None and committed is not None:
        matrix.rows = [r for r in matrix.rows if r["stage"] == BASE or r["stage"] in committed]
        matrix = matrix if matrix.rows else None
    status = run_info.get("status") or ("running" if recipe or stages else "unknown")
    return RunRecord(path=root, status=status, run_info=run_info, recipe=recipe, matrix=matrix,
                     base_evals=base_evals, stages=stages, warnings=warnings, name=root.name)


def label_runs(records: list[RunRecord]) -> list[RunRecord]:
    """Give each record a short distinct ``name``: the directory name, with its parent when two
    runs share a directory name (then ``#i`` as a last resort)."""
    names = [r.path.name for r in records]
    for r in records:
        r.name = r.path.name
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.name in seen:
            r.name = f"{r.name}#{i + 1}"
        seen[r.name] = i
    return records
