"""The empty MLflow store: built by the schema migrations once per MLflow version, then copied.

A copied store must be the store the migrations build (same tables, same schema version, a
usable client, the Default experiment pointing where a fresh one would), and a damaged
template must never cost a run its store."""

import sqlite3

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from safecl.tracking import _template, open_local_store


def _shape(db):
    with sqlite3.connect(db) as con:
        tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        version = con.execute("SELECT version_num FROM alembic_version").fetchall()
        default = con.execute("SELECT name, artifact_location FROM experiments WHERE experiment_id = 0").fetchall()
    return tables, version, default


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFECL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return _template(mlflow.__version__)


def test_the_copied_store_is_the_migrated_store(tmp_path, cache):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert not cache.exists()
    open_local_store(tmp_path / "a" / "mlflow.db", started=False)  # migrations, then the template
    assert cache.is_file()
    client = open_local_store(tmp_path / "b" / "mlflow.db", started=False)  # a copy of it
    assert _shape(tmp_path / "a" / "mlflow.db") == _shape(tmp_path / "b" / "mlflow.db")
    assert _shape(tmp_path / "b" / "mlflow.db")[2] == [("Default", str(tmp_path / "mlruns" / "0"))]
    exp = client.create_experiment("safecl", artifact_location=(tmp_path / "b" / "art").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "refusal", 0.5, step=1)
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}").get_metric_history(
        run.info.run_id, "refusal")[0].value == 0.5


def test_a_damaged_template_is_ignored_and_replaced(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)  # cut short
    open_local_store(tmp_path / "mlflow.db", started=False)
    tables, version, _ = _shape(tmp_path / "mlflow.db")
    assert "runs" in tables and len(version) == 1
    assert _shape(cache)[:2] == (tables, version)  # the template was built again from the migrations
    assert not list(tmp_path.glob(".mlflow.db.*"))  # no temporary store left behind
