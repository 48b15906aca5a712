"""The audit's numbers for one run, as one JSON-ready dict (what ``safecl audit --json`` prints).

Every score is copied from the run's files, never recomputed: R[t, j] from ``retention.json``
(or rebuilt from the stages' checks, see :mod:`safecl.audit.load`), n and the bootstrap
interval from the check records (``base_check.json``, ``metrics.json`` ``retention.evals``).
The derived metrics use the definitions of :class:`safecl.evaluation.matrix.RetentionMatrix`
(T = the final row, the last one not rolled back; o(j) = the row that trains column j):

- ``safety_retention`` = R[t, refusal] / R[safety, refusal]; ``refusal_drop`` = R[safety, refusal] - R[t, refusal]
- ``forgetting[j]``   = max over earlier non-rolled-back rows u of R[u, j] - R[T, j]
- ``transfer[j]``     = R[T, j] - R[o(j), j], per eval set (refusal and tasks); ``bwt`` is the
  mean of ``transfer`` over task columns with o(j) < T (GEM's backward transfer)
- ``over_refusal_change`` = R[T, over_refusal] - R[safety, over_refusal]
- ``learning[j]`` (task and ``nll:`` columns): base, before / after its own stage, final, gain,
  forward and backward transfer with paired intervals; ``learning_means``: their means over the
  task (``task``) and NLL (``nll``) columns (RetentionMatrix.learning / transfer_means)

Per stage the same quantities are given at that stage's row, with the verdict of
:mod:`safecl.audit.verdict`, plus the safety-keeping mechanisms the stage used and their cost
(:func:`stage_mechanisms`, :func:`stage_cost`, copied from its ``metrics.json``), ``repair_of`` /
``attempt`` for a repair pass of the gate and ``adopted_from`` for a stage copied from another
run. Per run: ``started_from`` (run.json) and ``cost`` (:func:`run_cost`).
"""

from __future__ import annotations

from safecl.audit.load import RunRecord, StageRecord
from safecl.audit.verdict import DriftRule, drift_reasons, stage_verdict
from safecl.evaluation.matrix import RetentionMatrix

AUDIT_VERSION = 1
_MASK_KEYS = ("entries", "total_entries", "density", "capacity_used", "owned_after", "share_of_free",
              "by_layer", "by_projection")
_TRAIN_KEYS = ("steps", "seconds", "first_loss", "last_loss", "mean_loss_last10")
_TERM_KEYS = ("mean", "last", "seconds", "seconds_per_step", "share_of_stage_time")
_ANCHOR_TERMS = {"anchor_kl": "kl", "anchor_direction": "direction"}
# seconds spent outside the training steps: (mechanism, key)
_SIDE_SECONDS = {"teacher_seconds": ("anchor", "teacher_seconds"),
                 "sensitivity_seconds": ("allocation", "sensitivity_seconds"),
                 "merge_seconds": ("merge", "seconds"), "direction_seconds": ("refusal_direction", "seconds")}


def _cell(record: RunRecord, checkpoint: str, column: str, score: float | None) -> dict:
    ev = record.evals_of(checkpoint).get(column, {})
    ci = ev.get("ci")
    return {"score": score, "n": ev.get("n"), "ci": list(ci) if isinstance(ci, list | tuple) else None}


def matrix_rows(record: RunRecord) -> list[dict]:
    """[{checkpoint, rolled_back, scores: {column: {score, n, ci}}}], row 0 = base when checked."""
    m = record.matrix
    if m is None:
        return []
    return [{"checkpoint": row["stage"], "rolled_back": row["rolled_back"],
             "scores": {c: _cell(record, row["stage"], c, row["scores"].get(c)) for c in m.columns}}
            for row in m.rows]


def transfer(m: RetentionMatrix) -> dict[str, float | None]:
    """{column: R[T, j] - R[o(j), j]} for refusal and task columns; None when a cell is missing,
    o(j) is not before T, or o(j) was rolled back (the cases BWT leaves out)."""
    final = m.final_stage
    t = m.stages.index(final) if final else -1
    out: dict[str, float | None] = {}
    for column in m.columns:
        own = m.own_stage(column)
        if own is None or column.startswith("nll:"):  # lower-is-better NLL: see summary["learning"]
            continue
        o = m.stages.index(own) if own in m.stages else None
        usable = o is not None and o < t and not m.rows[o]["rolled_back"]
        now, then = (m.get(final, column), m.get(own, column)) if usable else (None, None)
        out[column] = None if now is None or then is None else now - then
    return out


def _terms(metrics: dict) -> dict[str, dict]:
    """The stage's extra loss terms (``train.terms``) without their per-step values."""
    terms = (metrics.get("train") or {}).get("terms") or {}
    return {name: {k: t.get(k) for k in _TERM_KEYS} for name, t in terms.items() if isinstance(t, dict)}


def stage_mechanisms(st: StageRecord) -> dict:
    """What this stage used to keep safety, with its key numbers, copied from metrics.json:

    - every entry of ``mechanisms`` (replay, anchor, replay_distill, allocation, merge, ...),
      list values left out (merge.scaled_modules: ``scaled`` counts them);
    - ``anchor.loss``: ``kl`` / ``direction`` after its loss term, None when the anchors only
      served safety-aware allocation;
    - ``allocation`` {rule: safety-aware} also when only ``calibration.allocation`` says so;
    - ``refusal_direction`` of the safety stage;
    - ``repair`` {of, attempt, steps, density} for a repair pass of the gate.

    {} = a plain stage."""
    metrics = st.metrics or {}
    out = {name: {k: v for k, v in mech.items() if not isinstance(v, list)}
           for name, mech in (metrics.get("mechanisms") or {}).items() if isinstance(mech, dict)}
    if "anchor" in out:
        used = [loss for term, loss in _ANCHOR_TERMS.items() if term in _terms(metrics)]
        out["anchor"]["loss"] = used[0] if used else ("direction" if "direction_layer" in out["anchor"] else None)
    if "allocation" not in out and (metrics.get("calibration") or {}).get("allocation") == "safety-aware":
        out["allocation"] = {"rule": "safety-aware"}
    if isinstance(metrics.get("refusal_direction"), dict):
        out["refusal_direction"] = dict(metrics["refusal_direction"])
    if st.repair_of is not None:
        out["repair"] = {"of": st.repair_of, "attempt": st.attempt,
                         "steps": (metrics.get("train") or {}).get("steps"), "density": (st.mask or {}).get("density")}
    return out


def _sum(values) -> float | None:
    values = [v for v in values if isinstance(v, int | float)]
    return round(sum(values), 6) if values else None


def stage_cost(st: StageRecord, mechanisms: dict, train_seconds: float | None) -> dict:
    """What the mechanisms cost the stage, in seconds:

    - ``train_seconds``: the whole training of the stage (loss terms included);
    - ``terms``: each extra loss term (anchor_kl, anchor_direction, replay_distill) with its
      seconds, seconds_per_step, share_of_stage_time and its mean / last value; their sums
      ``terms_seconds_per_step`` and ``terms_share_of_stage_time``;
    - work outside the steps: ``teacher_seconds`` (anchor responses), ``sensitivity_seconds``
      (safety-aware allocation), ``merge_seconds``, ``direction_seconds`` (refusal direction);
    - ``extra_seconds``: the loss terms' seconds plus that work (None when nothing was used)."""
    terms = _terms(st.metrics or {})
    out: dict = {"train_seconds": train_seconds, "terms": terms,
                 "terms_seconds_per_step": _sum(t["seconds_per_step"] for t in terms.values()),
                 "terms_share_of_stage_time": _sum(t["share_of_stage_time"] for t in terms.values())}
    for key, (mech, field) in _SIDE_SECONDS.items():
        out[key] = (mechanisms.get(mech) or {}).get(field)
    out["extra_seconds"] = _sum([*(t["seconds"] for t in terms.values()), *(out[k] for k in _SIDE_SECONDS)])
    return out


def run_cost(stages: list[dict]) -> dict:
    """Totals over the run's stages: ``train_seconds``, mechanisms' ``extra_seconds``, and
    ``repair_seconds`` (training time of the gate's repair passes); None when nothing counted."""
    return {"train_seconds": _sum(st["cost"]["train_seconds"] for st in stages),
            "extra_seconds": _sum(st["cost"]["extra_seconds"] for st in stages),
            "repair_seconds": _sum(st["cost"]["train_seconds"] for st in stages if st["repair_of"])}


def _stage(record: RunRecord, st: StageRecord, rule: DriftRule, current: bool = False) -> dict:
    """One stage's numbers and verdict; ``current``: the stage a running run is working on."""
    m = record.matrix
    has_row = m is not None and st.name in m.stages
    safety = m.safety_stage if m is not None else None
    state = st.state if has_row or st.state != "checked" else "trained"  # a check with no row in R
    if current and state == "pending":
        state = "started"  # the run is loading the model or data of this stage
    out: dict = {"index": st.index, "name": st.name, "kind": st.kind, "state": state,
                 "rolled_back": st.rolled_back, "dir": str(st.dir) if st.dir else None,
                 "repair_of": st.repair_of, "attempt": st.attempt, "adopted_from": st.adopted_from}
    if has_row:
        after_safety = safety in m.stages and m.stages.index(st.name) > m.stages.index(safety)
        out.update(refusal=m.get(st.name, "refusal"), over_refusal=m.get(st.name, "over_refusal"),
                   safety_retention=m.safety_retention(st.name), refusal_drop=m.refusal_drop(st.name),
                   forgetting=m.forgetting(st.name))
    else:
        after_safety = False
        out.update(refusal=None, over_refusal=None, safety_retention=None, refusal_drop=None, forgetting={})
    reasons: list[str] = []
    notes: list[str] = []
    if state == "checked":
        reasons, notes = drift_reasons(rule, after_safety=after_safety, retention=out["safety_retention"],
                                       drop=out["refusal_drop"], over_refusal=out["over_refusal"],
                                       forgetting=out["forgetting"], safety_stage=safety)
    gate = st.gate
    out["verdict"] = stage_verdict(state=state, run_status=record.status, rolled_back=st.rolled_back,
                                   gate=gate, drift=reasons)
    out["drift_reasons"] = reasons
    out["notes"] = notes
    out["gate"] = None if gate is None else {k: gate.get(k) for k in ("fired", "action", "reasons")}
    metrics = st.metrics or {}
    entry = st.run_entry or {}
    train = metrics.get("train") or {}
    out["train"] = {k: train.get(k) for k in _TRAIN_KEYS} if train else None
    out["train_seconds"] = entry.get("train_seconds", train.get("seconds"))
    out["check_seconds"] = entry.get("check_seconds", (metrics.get("retention") or {}).get("seconds"))
    out["trainable_params"] = metrics.get("trainable_params")
    mask = st.mask
    out["mask"] = None if mask is None else {k: mask.get(k) for k in _MASK_KEYS}
    out["mask_file"] = str(st.mask_path) if st.mask_path else None
    out["mechanisms"] = stage_mechanisms(st)
    out["cost"] = stage_cost(st, out["mechanisms"], out["train_seconds"])
    probe = metrics.get("probe")
    out["probe"] = None if not probe else {k: probe.get(k) for k in ("every", "kind", "role", "probes", "seconds",
                                                                      "share_of_stage_time", "threshold", "fired")}
    out["watch"] = entry.get("watch")
    return out


def probe_curve(stages: list[dict], records: list) -> list[dict]:
    """The refusal probe over all task stages: {stage, step, global_step, probe_retention}; a
    stage's steps follow the optimizer steps of the stages before it."""
    curve, offset = [], 0
    for st, rec in zip(stages, records):
        probe = (rec.metrics or {}).get("probe") or {}
        for step, value in probe.get("points") or []:
            curve.append({"stage": st["name"], "step": step, "global_step": offset + step, "probe_retention": value})
        offset += (st.get("train") or {}).get("steps") or 0
    return curve


def audit_run(record: RunRecord, rule: DriftRule | None = None) -> dict:
    """The audit of one run (see the module docstring). ``rule`` defaults to the run's gate + 0.9/0.05."""
    rule = rule or DriftRule.for_run(record.gate_config)
    m = record.matrix
    summary = m.summary() if m is not None and m.rows else {}
    summary = {"final_stage": summary.get("final_stage"), "safety_stage": summary.get("safety_stage"),
               "bwt": summary.get("bwt"), "average_performance": summary.get("average_performance"),
               "over_refusal_change": summary.get("over_refusal_change"),
               "forgetting": summary.get("forgetting", {}), "transfer": transfer(m) if m is not None else {},
               "safety_retention": summary.get("safety_retention", {}),
               "refusal_drop": summary.get("refusal_drop", {}),
               "learning": summary.get("learning", {}), "learning_means": summary.get("transfer", {})}
    info = record.run_info
    current = None
    if record.status == "running":
        current = next((st for st in record.stages if st.state != "checked"), None)
    stages = [_stage(record, st, rule, current=st is current) for st in record.stages]
    return {
        "name": record.name, "run_dir": str(record.path), "status": record.status,
        "method": record.method, "model": record.model,
        "halted_at": info.get("halted_at"), "reasons": info.get("reasons") or [],
        "started": info.get("started"), "ended": info.get("ended"),
        "started_from": record.started_from,
        "mlflow_killed": list((info.get("mlflow") or {}).get("killed") or []),
        "gate": record.gate_config, "rule": rule.to_dict(),
        "columns": m.columns if m is not None else [],
        "matrix": matrix_rows(record),
        "stages": stages,
        "probe": probe_curve(stages, record.stages),
        "cost": run_cost(stages),
        "summary": summary,
        "warnings": list(record.warnings),
    }


def audit_runs(records: list[RunRecord], min_retention: float | None = None,
               max_forgetting: float | None = None) -> dict:
    """The JSON document of ``safecl audit --json``: {"audit_version", "runs": [audit_run ...]}."""
    runs = []
    for record in records:
        kwargs = {k: v for k, v in (("min_retention", min_retention), ("max_forgetting", max_forgetting))
                  if v is not None}
        runs.append(audit_run(record, DriftRule.for_run(record.gate_config, **kwargs)))
    return {"audit_version": AUDIT_VERSION, "runs": runs}
