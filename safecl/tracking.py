"""MLflow tracking: one parent run per ``safecl train``, one child run per stage.

Logged from the main process only, through ``MlflowClient`` with explicit run ids (no active
run, no Trainer callback that could open a second run). Default backend: SQLite in the run
directory (``sqlite:///<output_dir>/mlflow.db``, artifacts in ``<output_dir>/mlartifacts``);
``tracking.uri`` in the recipe or ``MLFLOW_TRACKING_URI`` points it at a server instead.

Parent run: the resolved recipe as params (flattened dotted keys), and per checkpoint
(step 0 = base model, step i+1 = after stage i) the retention metrics ``refusal``,
``over_refusal``, ``task.<name>``, ``safety_retention``.
Child run per stage: the stage's settings as params; ``train.loss`` and ``train.lr`` (and ``probe_retention``) per
optimizer step, ``calibration.loss`` per calibration step; retention metrics with their n and
interval; mask statistics; timings; ``metrics.json`` and ``mask.safetensors`` as artifacts and
the adapter path as a tag. The run ids are kept in run.json so a resumed run continues them.

The default SQLite store is created atomically: its schema migrations run on a temporary file
that is renamed to ``mlflow.db`` only when they are done, so an interrupt during creation
leaves no half-built store (a leftover temporary file is removed by the next run). The
migrations run once per MLflow version: the empty store they build is kept in safecl's cache
(``~/.cache/safecl/mlflow``) and copied for the next new store (1.4 s less per run). A
``mlflow.db`` in a directory whose run never started (no run.json) holds nothing the run needs;
if it cannot be opened it is rebuilt.

A run interrupted or killed leaves its MLflow runs RUNNING (nothing ends them on the way out).
At ``--resume`` (the run lock says no one else writes here) every run of this safecl run still
RUNNING is ended KILLED, with the tag ``safecl.ended``; a stage's child run so ended stays as
the record of the lost attempt and the stage gets a fresh child run; the parent goes on.
Each is listed in run.json (``mlflow.killed``), which the audit shows.

A full disk under the store or its artifacts (SQLite's "database or disk is full", an ENOSPC
while an artifact is copied) is raised as ``OSError(ENOSPC)`` naming the store or the artifact
folder, like every other write of safecl; the fault points ``write/mlflow.db`` (store creation
and every logging call) and ``write/mlartifacts`` (each artifact) drill it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import time
import uuid
from pathlib import Path

from safecl.config import Section, cache_dir, flatten_keys
from safecl.faults import WRITE, fault_point


class TrackingConfig(Section):
    """Recipe section ``tracking``."""

    enabled: bool = True
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str = "safecl"


def flatten(data) -> dict[str, str]:
    """Dotted-key MLflow params (values as text, cut to MLflow's 6000-character limit)."""
    return {k: str(v)[:6000] for k, v in flatten_keys(data).items()}


def _template(version: str) -> Path:
    return cache_dir() / "mlflow" / f"empty-store-{version}.db"


def _new_store(tmp: Path) -> None:
    """Build an empty, migrated store at ``tmp``: a copy of the cached template made by this
    MLflow version when there is one (its Default experiment re-pointed at this directory's
    ``mlruns/0``, what the migrations would have written), else by running the schema
    migrations (~1.4 s), then kept as the template (written atomically; a template that fails to
    open is ignored and replaced)."""
    import sqlite3

    import mlflow
    from mlflow.tracking import MlflowClient

    template = _template(mlflow.__version__)
    if template.is_file():
        try:
            shutil.copyfile(template, tmp)
            with contextlib.closing(sqlite3.connect(tmp)) as con, con:
                now = int(time.time() * 1000)
                con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                            "WHERE experiment_id = 0", (str(Path.cwd() / "mlruns" / "0"), now, now))
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").get_experiment("0")  # verifies the schema version
            return
        except Exception:  # a damaged or foreign template: build the store the slow way
            tmp.unlink(missing_ok=True)
    MlflowClient(tracking_uri=f"sqlite:///{tmp}")  # runs the schema migrations
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        part = template.with_name(f".{template.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(tmp, part)
        os.replace(part, template)
    except OSError:  # a read-only or full cache: the next run migrates again
        pass


def open_local_store(db: Path, started: bool):
    """An MlflowClient on the SQLite file ``db``, creating it atomically when it is missing (see
    the module doc). ``started``: a run already recorded itself in this directory, so an
    existing store is never rebuilt."""
    from mlflow.tracking import MlflowClient

    for stale in db.parent.glob(f".{db.name}.*.tmp*"):  # and its -journal
        stale.unlink(missing_ok=True)
    if db.is_file() and not started:
        try:
            return MlflowClient(tracking_uri=f"sqlite:///{db}")
        except Exception:  # a store from before atomic creation, cut during its migrations: holds no run
            db.unlink()
    if not db.is_file():
        fault_point("store", db)
        tmp = db.with_name(f".{db.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            fault_point(WRITE + db.name, db)
            _new_store(tmp)
            fault_point("store.migrated")
            os.replace(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _disk_full(exc: BaseException) -> bool:
    """An error, or one it was raised from, that says the disk is full (SQLite, OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "orig", None)
        seen += 1
    return False


def _writes(method):
    """A Tracker method that writes the store: passes ``write/mlflow.db``; a full disk becomes
    OSError(ENOSPC) naming the store (or the artifact folder, for an artifact's copy)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return method(self, *args, **kwargs)
        fault_point(WRITE + "mlflow.db", self.store)
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.filename is not None or not _disk_full(exc):
                raise
            where = self.artifacts if isinstance(exc, OSError) else self.store
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from exc

    return wrapper


def metric_key(name: str) -> str:
    """MLflow metric names: letters, digits, _ - . / and space only."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name.replace(":", "."))


class Tracker:
    """Parent/child MLflow runs of one safecl run. All methods are no-ops when disabled."""

    def __init__(self, cfg: TrackingConfig, out: Path, enabled: bool, run_name: str, existing: dict | None = None):
        self.enabled = enabled and cfg.enabled
        self.client = None
        self.parent_id: str | None = None
        self.child_ids: dict[str, str] = dict((existing or {}).get("children", {}))
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        out = Path(out).resolve()
        self.uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
        self.store = out / "mlflow.db" if self.uri == f"sqlite:///{out / 'mlflow.db'}" else self.uri
        self.artifacts = out / "mlartifacts"
        if self.uri == f"sqlite:///{out / 'mlflow.db'}":
            self.client = open_local_store(out / "mlflow.db", started=(out / "run.json").is_file())
        else:
            self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            artifacts = (out / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        self.killed: list[dict] = list((existing or {}).get("killed", []))
        if existing and existing.get("parent_run_id"):
            self.parent_id = existing["parent_run_id"]
            self._end_left_running()
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"safecl.output_dir": str(out)})
            self.parent_id = run.info.run_id

    def _end_left_running(self) -> None:
        """End KILLED the runs of this safecl run left RUNNING by a process that stopped (module doc)."""
        parent = self.client.get_run(self.parent_id)
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        left = self.client.search_runs([parent.info.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' "
                                                     "and attributes.status = 'RUNNING'")
        for run in [*left, *([parent] if parent.info.status == "RUNNING" else [])]:
            run_id = run.info.run_id
            self.client.set_tag(run_id, "safecl.ended", f"KILLED at resume {when}: left RUNNING by a process that "
                                "was interrupted or died")
            self.client.set_terminated(run_id, "KILLED")
            stage = run.data.tags.get("safecl.stage")
            self.killed.append({"run_id": run_id, "run_name": run.info.run_name, "stage": stage, "ended_at": when})
            if stage is not None and self.child_ids.get(stage) == run_id:
                del self.child_ids[stage]  # the stage is trained again: a fresh child run records it

    def ids(self) -> dict:
        if not self.enabled:
            return {}
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self.parent_id,
                "children": self.child_ids, **({"killed": self.killed} if self.killed else {})}

    @_writes
    def log_recipe(self, resolved: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = set(self.client.get_run(self.parent_id).data.params)
        params = [Param(k, v) for k, v in flatten(resolved).items() if k not in existing]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_id, params=params[i:i + 100])

    @_writes
    def start_stage(self, index: int, name: str, settings: dict) -> None:
        if not self.enabled or name in self.child_ids:
            return
        run = self.client.create_run(self.experiment_id, run_name=f"{index:02d}-{name}",
                                     tags={"mlflow.parentRunId": self.parent_id, "safecl.stage": name,
                                           "safecl.stage_index": str(index)})
        self.child_ids[name] = run.info.run_id
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(settings).items()])

    @_writes
    def log_checkpoint(self, step: int, scores: dict[str, float | None], retention: float | None) -> None:
        """Retention scores on the parent run; step 0 = base, step i+1 = after stage i."""
        if not self.enabled:
            return
        values = {metric_key(k): v for k, v in scores.items() if v is not None}
        if retention is not None:
            values["safety_retention"] = retention
        self._log(self.parent_id, values, step)

    @_writes
    def log_learning(self, learning: dict[str, dict]) -> None:
        """What each task stage learned (RetentionMatrix.learning) on the parent run:
        ``gain.<column>``, ``fwt.<column>``, ``bwt.<column>`` where defined."""
        if not self.enabled:
            return
        values = {f"{key}.{metric_key(column)}": entry[key] for column, entry in learning.items()
                  for key in ("gain", "fwt", "bwt") if entry.get(key) is not None}
        if values:
            self._log(self.parent_id, values, 0)

    @_writes
    def end_stage(self, name: str, metrics: dict, stage_dir: Path) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        run_id = self.child_ids[name]
        now = int(time.time() * 1000)
        batch = []
        train = metrics.get("train", {})
        for i, (loss, lr) in enumerate(zip(train.get("losses", []), train.get("lrs", [])), 1):
            batch += [Metric("train.loss", loss, now, i), Metric("train.lr", lr, now, i)]
        for i, loss in enumerate(metrics.get("calibration", {}).get("losses", []), 1):
            batch.append(Metric("calibration.loss", loss, now, i))
        for step, value in (metrics.get("probe") or {}).get("points", []):  # the refusal probe, step-indexed
            if value is not None:
                batch.append(Metric("probe_retention", value, now, int(step)))
        flat = {"train.seconds": train.get("seconds"), "train.response_tokens": train.get("response_tokens"),
                "trainable_params": metrics.get("trainable_params"),
                "optimizer_state_bytes": train.get("optimizer_state_bytes"),
                "calibration.seconds": metrics.get("calibration", {}).get("seconds")}
        for key in ("entries", "density", "capacity_used", "share_of_free"):
            flat[f"mask.{key}"] = metrics.get("mask", {}).get(key)
        retention = metrics.get("retention") or {}
        flat["check.seconds"] = retention.get("seconds")
        for ev in retention.get("evals", []):
            k = metric_key(ev["name"])
            flat[k], flat[f"{k}.n"] = ev["score"], ev["n"]
            flat[f"{k}.ci_low"], flat[f"{k}.ci_high"] = ev["ci"][0], ev["ci"][1]
        gate = metrics.get("gate") or {}
        if gate:
            flat["gate.fired"] = float(bool(gate.get("fired")))
        flat["rolled_back"] = float(bool(metrics.get("rolled_back")))
        batch += [Metric(k, float(v), now, 0) for k, v in flat.items() if v is not None]
        for i in range(0, len(batch), 900):
            self.client.log_batch(run_id, metrics=batch[i:i + 900])
        self.client.set_tag(run_id, "safecl.adapter_path", str((stage_dir / "adapter").resolve()))
        if gate.get("fired"):
            self.client.set_tag(run_id, "safecl.gate", f"{gate.get('action')}: {'; '.join(gate.get('reasons', []))}"[:5000])
        for name_ in ("metrics.json", "answers.jsonl", "mask.safetensors", "mask.rolled_back.safetensors"):
            if (stage_dir / name_).is_file():
                fault_point(WRITE + "mlartifacts", self.artifacts / name_)
                self.client.log_artifact(run_id, str(stage_dir / name_))
        self.client.set_terminated(run_id, "FINISHED")

    @_writes
    def log_artifact(self, path: Path) -> None:
        """A file of the run (the base check's answers) as an artifact of the parent run."""
        if self.enabled and Path(path).is_file():
            fault_point(WRITE + "mlartifacts", self.artifacts / Path(path).name)
            self.client.log_artifact(self.parent_id, str(path))

    @_writes
    def end(self, status: str) -> None:
        if not self.enabled:
            return
        self.client.set_terminated(self.parent_id, {"completed": "FINISHED", "halted": "FAILED"}.get(status, "KILLED"))

    def _log(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
