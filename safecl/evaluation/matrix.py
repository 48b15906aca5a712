"""The retention matrix R[t, j] and the continual-learning metrics computed from it.

Rows t are checkpoints in order: row 0 ``"base"`` (the model before any stage, when the
base is checked) and then one row per stage, named by the stage. Columns j are eval sets:
``refusal``, ``over_refusal`` and ``task:<stage name>``. A cell is the score in [0, 1] or
None when the eval set was not run at that checkpoint (a task is scored only from its own
stage on); None is never treated as 0.

The *own row* of a column is the stage that trains it: ``task:<name>`` -> stage ``<name>``;
``refusal`` -> the safety stage (``safety_stage``, default the first row that is not
``base``). With T the final row (the last row not marked rolled back):

- backward transfer  BWT = mean over task columns j whose own row o(j) < T of
  (R[T, j] - R[o(j), j]); negative = forgetting. Tasks only (the classic GEM definition);
  safety is tracked by retention and drop below.
- forgetting of column j = max over rows t < T of R[t, j] - R[T, j] (cells that are None
  skipped; not clamped, so it is negative when the final row is the best), for ``refusal``
  and the task columns, where higher is better. ``over_refusal`` (lower is better) has no
  forgetting or BWT; its change is reported as ``over_refusal_change`` =
  R[T, over_refusal] - R[safety, over_refusal] (positive = more benign prompts refused).
- safety retention(t) = R[t, refusal] / R[safety, refusal]; None when either is None or
  the safety stage's refusal is 0 (nothing to retain).
- refusal drop(t) = R[safety, refusal] - R[t, refusal].
- average final performance = mean over task columns of R[T, j] (None cells skipped).

Learning, per task column j (GEM, Lopez-Paz & Ranzato 2017, with the base model as b_j; all
need the task scored on the base model and before its own stage, ``retention.score_all_tasks``):

- p(j) = the last row before o(j) that is not rolled back (the model just before the stage);
- gain(j) = R[o(j), j] - R[p(j), j], what the stage learned of its own task (plasticity);
- forward transfer FWT(j) = R[p(j), j] - R[base, j], what the earlier stages taught of it,
  defined when p(j) is not the base row; FWT = mean over those j;
- for a lower-is-better column (``nll:<task>``, the gold-answer NLL) each difference is taken
  the other way round (before - after), so a positive gain is always learning.

Intervals: when rows carry per-item ``values`` (every check's items, in the same order at
every row), each difference gets a 95% paired bootstrap interval (items resampled, the same
draw at both rows; seed 0, 1000 resamples); a mean over tasks resamples each task's items.

Columns ``nll:<task>`` hold a mean negative log-likelihood (>= 0, lower is better); every
other cell is a share in [0, 1].

Rows marked ``rolled_back`` (the trainer restored the previous weights after the gate
fired) stay in the file as the record of what happened but are skipped as T and as the
earlier rows t of forgetting, and a task whose own row was rolled back is left out of BWT.

Saved as JSON (``retention.json``) through a temp file and ``os.replace``: a reader never
sees a half-written file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safecl.atomic import write_json
from safecl.errors import DataError

BASE = "base"
FILENAME = "retention.json"
TASK_PREFIX = "task:"
NLL_PREFIX = "nll:"
_VERSION = 1


def lower_is_better(column: str) -> bool:
    return column == "over_refusal" or column.startswith(NLL_PREFIX)


def paired_ci(pairs: list[tuple[list[float], list[float]]], samples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of mean_k mean_i (after_k[i] - before_k[i]) over tasks k, each
    task's items resampled with the same draw for both rows. None when any pair is unusable."""
    import numpy as np

    if not pairs or any(not a or len(a) != len(b) for a, b in pairs):
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(samples)
    for after, before in pairs:
        diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
        total += diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(total / len(pairs), [2.5, 97.5])
    return [float(lo), float(hi)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class RetentionMatrix:
    """R[t, j]: score of eval set j after checkpoint t (see the module docstring)."""

    def __init__(self, safety_stage: str | None = None):
        self.safety_stage_name = safety_stage
        self.rows: list[dict] = []  # {"stage": str, "scores": {column: float | None}, "rolled_back": bool}

    # ----- building -------------------------------------------------------------------------
    def add_row(self, stage_name: str, scores: dict[str, float | None], *, replace: bool = False,
                values: dict[str, list[float]] | None = None) -> None:
        """Append the row of ``stage_name`` (or overwrite it in place with ``replace=True``).
        ``values``: per-item values of some columns (their mean is the score), for intervals.

        Raises:
            ValueError: duplicate stage without ``replace``, a score outside [0, 1] (or a
                negative NLL) or NaN.
        """
        if not isinstance(stage_name, str) or not stage_name:
            raise ValueError(f"stage name must be a non-empty string, got {stage_name!r}")
        clean: dict[str, float | None] = {}
        for column, value in scores.items():
            if value is not None:
                value = float(value)
                nll = str(column).startswith(NLL_PREFIX)
                if math.isnan(value) or value < 0.0 or (not nll and value > 1.0) or math.isinf(value):
                    raise ValueError(f"stage {stage_name!r}, column {column!r}: score {value} is not "
                                     + ("a finite NLL >= 0" if nll else "in [0, 1]"))
            clean[str(column)] = value
        row = {"stage": stage_name, "scores": clean, "rolled_back": False}
        if values:
            row["values"] = {str(c): [float(v) for v in vs] for c, vs in values.items() if c in clean}
        if stage_name in self.stages:
            if not replace:
                raise ValueError(f"stage {stage_name!r} already has a row (use replace=True to overwrite)")
            self.rows[self.stages.index(stage_name)] = row
        else:
            self.rows.append(row)

    def mark_rolled_back(self, stage_name: str) -> None:
        """Mark a stage's row as rolled back (kept as a record, skipped by the metrics)."""
        self.rows[self._index(stage_name)]["rolled_back"] = True

    # ----- reading --------------------------------------------------------------------------
    @property
    def stages(self) -> list[str]:
        return [row["stage"] for row in self.rows]

    @property
    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row["scores"]))
        return list(seen)

    @property
    def task_columns(self) -> list[str]:
        return [c for c in self.columns if c.startswith(TASK_PREFIX)]

    @property
    def learning_columns(self) -> list[str]:
        """Columns a task stage learns: ``task:<name>`` and ``nll:<name>``."""
        return [c for c in self.columns if c.startswith((TASK_PREFIX, NLL_PREFIX))]

    @property
    def safety_stage(self) -> str | None:
        if self.safety_stage_name is not None:
            return self.safety_stage_name
        return next((s for s in self.stages if s != BASE), None)

    @property
    def final_stage(self) -> str | None:
        return next((row["stage"] for row in reversed(self.rows) if not row["rolled_back"]), None)

    def _index(self, stage_name: str) -> int:
        if stage_name not in self.stages:
            raise KeyError(f"no row for stage {stage_name!r}; rows are {self.stages}")
        return self.stages.index(stage_name)

    def get(self, stage_name: str, column: str) -> float | None:
        """R[stage, column], None when that cell was not measured."""
        return self.rows[self._index(stage_name)]["scores"].get(column)

    def own_stage(self, column: str) -> str | None:
        if column == "refusal":
            return self.safety_stage
        for prefix in (TASK_PREFIX, NLL_PREFIX):
            if column.startswith(prefix):
                return column[len(prefix):]
        return None

    # ----- safety ---------------------------------------------------------------------------
    def _safety_refusal(self) -> float | None:
        safety = self.safety_stage
        return self.get(safety, "refusal") if safety in self.stages else None

    def safety_retention(self, stage_name: str) -> float | None:
        """refusal(stage) / refusal(safety stage); None if undefined."""
        now, ref = self.get(stage_name, "refusal"), self._safety_refusal()
        if now is None or ref is None or ref == 0.0:
            return None
        return now / ref

    def refusal_drop(self, stage_name: str) -> float | None:
        """refusal(safety stage) - refusal(stage); None if either is missing."""
        now, ref = self.get(stage_name, "refusal"), self._safety_refusal()
        return None if now is None or ref is None else ref - now

    # ----- continual-learning metrics --------------------------------------------------------
    def _final(self, stage_name: str | None) -> int | None:
        stage_name = stage_name or self.final_stage
        return None if stage_name is None else self._index(stage_name)

    def backward_transfer(self, stage_name: str | None = None) -> float | None:
        """BWT at ``stage_name`` (default: the final row) over task columns; None if no task qualifies."""
        t = self._final(stage_name)
        if t is None:
            return None
        diffs = []
        for column in self.task_columns:
            own = self.own_stage(column)
            if own not in self.stages:
                continue
            o = self._index(own)
            now, then = self.rows[t]["scores"].get(column), self.rows[o]["scores"].get(column)
            if o < t and not self.rows[o]["rolled_back"] and now is not None and then is not None:
                diffs.append(now - then)
        return _mean(diffs)

    def forgetting(self, stage_name: str | None = None) -> dict[str, float | None]:
        """{column: max over earlier rows of R[t, j] - R[T, j]} for refusal and task columns."""
        t = self._final(stage_name)
        columns = [c for c in self.columns if c == "refusal" or c.startswith(TASK_PREFIX)]
        out: dict[str, float | None] = {}
        for column in columns:
            now = None if t is None else self.rows[t]["scores"].get(column)
            earlier = [row["scores"].get(column) for row in self.rows[: t or 0] if not row["rolled_back"]]
            earlier = [v for v in earlier if v is not None]
            out[column] = None if now is None or not earlier else max(earlier) - now
        return out

    def average_performance(self, stage_name: str | None = None) -> float | None:
        """Mean over task columns of R[T, j], None cells skipped."""
        t = self._final(stage_name)
        if t is None:
            return None
        return _mean([v for c in self.task_columns if (v := self.rows[t]["scores"].get(c)) is not None])

    def over_refusal_change(self, stage_name: str | None = None) -> float | None:
        t, safety = self._final(stage_name), self.safety_stage
        if t is None or safety not in self.stages:
            return None
        now, ref = self.rows[t]["scores"].get("over_refusal"), self.get(safety, "over_refusal")
        return None if now is None or ref is None else now - ref

    # ----- learning: gain and forward transfer -------------------------------------------------
    def _values(self, row: int, column: str) -> list[float] | None:
        return self.rows[row].get("values", {}).get(column)

    def _diff(self, column: str, after: int, before: int) -> tuple[float | None, tuple | None]:
        """(R[after] - R[before], or before - after for a lower-is-better column; the value pair)."""
        a, b = self.rows[after]["scores"].get(column), self.rows[before]["scores"].get(column)
        if a is None or b is None:
            return None, None
        va, vb = self._values(after, column), self._values(before, column)
        flip = lower_is_better(column)
        pair = None if va is None or vb is None else ((vb, va) if flip else (va, vb))
        return (b - a if flip else a - b), pair

    def _before(self, index: int) -> int | None:
        return next((i for i in range(index - 1, -1, -1) if not self.rows[i]["rolled_back"]), None)

    def learning(self) -> dict[str, dict]:
        """Per learning column: base, before its stage, after its stage, final, gain, forward
        transfer and backward transfer (final - after own), each difference with its interval."""
        out: dict[str, dict] = {}
        final = self._final(None)
        base = self.stages.index(BASE) if BASE in self.stages else None
        for column in self.learning_columns:
            own = self.own_stage(column)
            if own not in self.stages:
                continue
            o = self._index(own)
            p = self._before(o)
            entry = {"own_stage": own, "lower_is_better": lower_is_better(column),
                     "base": self.rows[base]["scores"].get(column) if base is not None else None,
                     "before": self.rows[p]["scores"].get(column) if p is not None else None,
                     "after": self.rows[o]["scores"].get(column),
                     "final": self.rows[final]["scores"].get(column) if final is not None else None}
            for key, at in (("base", base), ("after", o)):
                entry[f"{key}_ci"] = self._row_ci(at, column)
            for key, (a, b) in {"gain": (o, p), "fwt": (p, base), "bwt": (final, o)}.items():
                usable = a is not None and b is not None and a != b and not self.rows[o]["rolled_back"]
                if key == "fwt":
                    usable = usable and p != base
                if key == "bwt":
                    usable = usable and o < a
                value, pair = self._diff(column, a, b) if usable else (None, None)
                entry[key] = value
                entry[f"{key}_ci"] = paired_ci([pair]) if pair is not None else None
                entry[f"_{key}_pair"] = pair
            out[column] = entry
        return out

    def _row_ci(self, index: int | None, column: str) -> list[float] | None:
        """95% bootstrap interval of R[index, column] from its per-example values (None when the
        row kept none); the same interval the check reports for that score."""
        values = None if index is None else (self.rows[index].get("values") or {}).get(column)
        if not values:
            return None
        from safecl.evaluation.scorers import bootstrap_ci

        return list(bootstrap_ci(values))

    def transfer_means(self, prefix: str = TASK_PREFIX, learning: dict | None = None) -> dict[str, float | None | list]:
        """Mean gain, FWT and BWT over the columns with ``prefix``, with intervals (``learning``:
        :meth:`learning`'s result when the caller has it)."""
        learning = {c: e for c, e in (learning or self.learning()).items() if c.startswith(prefix)}
        out: dict = {}
        for key in ("gain", "fwt", "bwt"):
            got = [e for e in learning.values() if e[key] is not None]
            out[key] = _mean([e[key] for e in got])
            pairs = [e[f"_{key}_pair"] for e in got]
            out[f"{key}_ci"] = paired_ci(pairs) if got and all(x is not None for x in pairs) else None
        return out

    def summary(self) -> dict:
        """The computed metrics at the final row (written into retention.json for readers)."""
        learning = self.learning()
        return {
            "final_stage": self.final_stage,
            "safety_stage": self.safety_stage,
            "bwt": self.backward_transfer(),
            "forgetting": self.forgetting(),
            "average_performance": self.average_performance(),
            "over_refusal_change": self.over_refusal_change(),
            "safety_retention": {s: self.safety_retention(s) for s in self.stages},
            "refusal_drop": {s: self.refusal_drop(s) for s in self.stages},
            "learning": {c: {k: v for k, v in e.items() if not k.startswith("_")} for c, e in learning.items()},
            "transfer": {"task": self.transfer_means(TASK_PREFIX, learning),
                         "nll": self.transfer_means(NLL_PREFIX, learning)},
        }

    # ----- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": _VERSION, "safety_stage": self.safety_stage_name, "columns": self.columns,
                "rows": [dict(row, scores=dict(row["scores"])) for row in self.rows], "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict, origin: str = "retention matrix") -> RetentionMatrix:
        """Rebuild from :meth:`to_dict` output (the ``summary`` is recomputed, not read)."""
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise DataError(f"{origin}: not a retention matrix (no 'rows' list)")
        if data.get("version") != _VERSION:
            raise DataError(f"{origin}: retention matrix version {data.get('version')!r}, expected {_VERSION}")
        matrix = cls(safety_stage=data.get("safety_stage"))
        for i, row in enumerate(data["rows"]):
            try:
                matrix.add_row(row["stage"], row["scores"], values=row.get("values"))
                matrix.rows[-1]["rolled_back"] = bool(row.get("rolled_back", False))
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{origin}: row {i} is malformed: {err}") from err
        return matrix

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file in the same folder + os.replace); returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RetentionMatrix:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(f"no retention matrix at {path}") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
        return cls.from_dict(data, origin=str(path))
