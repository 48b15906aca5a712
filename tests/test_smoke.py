"""The smoke recipe through the real CLI: every stage leaves an adapter, a mask and metrics."""

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SMOKE


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(SMOKE), f"output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_every_stage_writes_adapter_mask_and_metrics(smoke_run):
    out, proc = smoke_run
    assert (out / "recipe.resolved.yaml").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and [s["name"] for s in run["stages"]] == ["safety", "arithmetic", "sentiment"]
    for i, name in enumerate(["safety", "arithmetic", "sentiment"]):
        d = out / "stages" / f"{i:02d}-{name}"
        cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert (d / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        assert (d / "mask.safetensors").is_file()
        m = json.loads((d / "metrics.json").read_text())
        assert m["stage"] == name and m["train"]["steps"] == 20 and len(m["train"]["losses"]) == 20
        assert all(math.isfinite(x) for x in m["train"]["losses"])
        assert m["mask"]["capacity_used"] == pytest.approx(0.1 * (i + 1), abs=1e-3)
    assert "it/s" in proc.stderr  # progress bars were shown


def test_smoke_training_reduces_loss(smoke_run):
    out, _ = smoke_run
    m = json.loads((out / "stages" / "00-safety" / "metrics.json").read_text())
    assert m["train"]["mean_loss_last10"] < m["train"]["first_loss"]


def test_rerun_into_a_different_run_dir_is_refused(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(SMOKE), f"output_dir={out}", "seed=5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "holds a different run" in proc.stderr


def test_retention_checked_after_base_and_every_stage(smoke_run):
    out, _ = smoke_run
    matrix = json.loads((out / "retention.json").read_text())
    assert [r["stage"] for r in matrix["rows"]] == ["base", "safety", "arithmetic", "sentiment"]
    every = ["refusal", "over_refusal", "task:arithmetic", "nll:arithmetic", "task:sentiment", "nll:sentiment"]
    for row in matrix["rows"]:  # score_all_tasks: every task at every row, the base model included
        assert list(row["scores"]) == every and all(row["scores"][c] is not None for c in every)
        assert all(len(row["values"][c]) == 8 for c in every)
    m = json.loads((out / "stages" / "02-sentiment" / "metrics.json").read_text())
    names = [e["name"] for e in m["retention"]["evals"]]
    assert names == every
    learning = matrix["summary"]["learning"]
    a = learning["task:arithmetic"]
    assert a["before"] == matrix["rows"][1]["scores"]["task:arithmetic"]
    assert a["gain"] == pytest.approx(matrix["rows"][2]["scores"]["task:arithmetic"] - a["before"])
    n = learning["nll:arithmetic"]  # lower is better: gain = before - after
    assert n["gain"] == pytest.approx(matrix["rows"][1]["scores"]["nll:arithmetic"]
                                      - matrix["rows"][2]["scores"]["nll:arithmetic"])
    assert n["gain"] > 0  # 20 steps on the task lower its gold-answer NLL even on the tiny model
    assert m["retention"]["evals"][0]["n"] == 8 and m["retention"]["evals"][0]["measured_by"]["kind"] == "keyword"


def test_mlflow_store_has_parent_and_one_child_per_stage(smoke_run):
    from mlflow.tracking import MlflowClient

    out, _ = smoke_run
    run = json.loads((out / "run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("safecl")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run["mlflow"]["parent_run_id"]]
    assert len(parents) == 1 and parents[0].info.run_id == run["mlflow"]["parent_run_id"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.params["adapter.method"] == "lori-s"
    assert sorted(c.data.tags["safecl.stage"] for c in children) == ["arithmetic", "safety", "sentiment"]
    for child in children:
        keys = set(child.data.metrics)
        assert {"train.loss", "train.lr", "calibration.loss", "refusal", "over_refusal", "refusal.n", "refusal.ci_low",
                "mask.entries", "mask.capacity_used", "train.seconds", "check.seconds"} <= keys
        history = client.get_metric_history(child.info.run_id, "train.loss")
        stage = child.data.tags["safecl.stage"]
        idx = ["safety", "arithmetic", "sentiment"].index(stage)
        metrics = json.loads((out / "stages" / f"{idx:02d}-{stage}" / "metrics.json").read_text())
        assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(metrics["train"]["losses"])
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"metrics.json", "mask.safetensors"} <= artifacts
    parent = client.get_run(run["mlflow"]["parent_run_id"]).data.metrics
    assert "task.sentiment" in parent and "nll.sentiment" in parent
    learning = json.loads((out / "retention.json").read_text())["summary"]["learning"]
    assert parent["gain.nll.arithmetic"] == pytest.approx(learning["nll:arithmetic"]["gain"])
    assert parent["fwt.task.sentiment"] == pytest.approx(learning["task:sentiment"]["fwt"])


def test_train_ends_with_the_stage_table_and_the_audit_command(smoke_run):
    out, proc = smoke_run
    tail = proc.stdout[proc.stdout.index("run completed"):]
    m = json.loads((out / "retention.json").read_text())
    table = tail[:tail.index("[safecl] what each task stage learned")]
    rows = [line.split() for line in table.splitlines() if line.startswith("  ") and not line.strip().startswith("-")]
    assert rows[0][:3] == ["after", "refusal", "over_refusal"]
    learned = tail[tail.index("[safecl] what each task stage learned"):]
    assert "nll:arithmetic (lower is better)" in learned and "task:sentiment" in learned
    assert [r[0] for r in rows[1:]] == [row["stage"] for row in m["rows"]]
    assert rows[-1][1] == f"{m['rows'][-1]['scores']['refusal']:.2f}"
    assert f"safecl audit {out} --report" in tail


def test_base_row_task_scores_equal_a_direct_check_of_the_base_model(smoke_run):
    """Row 0's task scores are what run_retention_check gives on a freshly loaded base model."""
    from safecl.data.sources import load_examples
    from safecl.evaluation.check import run_retention_check
    from safecl.models import load_model_and_tokenizer
    from safecl.recipe.loader import load_recipe

    out, _ = smoke_run
    recipe = load_recipe(SMOKE)
    model, tok = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    tasks = [(s.name, s.eval) for s in recipe.stages if s.eval is not None]
    result = run_retention_check(model, tok, recipe.retention, tasks, SMOKE.parent, recipe.seed,
                                 lambda cfg: load_examples(cfg, SMOKE.parent, seed=recipe.seed,
                                                           need_response=False)[0])
    base = json.loads((out / "retention.json").read_text())["rows"][0]
    assert base["stage"] == "base"
    direct = result.scores()
    assert set(direct) == set(base["scores"])
    for column, score in direct.items():
        assert base["scores"][column] == pytest.approx(score, abs=1e-6), column
