"""Faults, round two: a full disk at every kind of write, an audit beside a live run, MLflow runs
left RUNNING by a SIGKILL, a ``--from RUN:STAGE`` interrupted while it copies.

Faults are injected at the named points of safecl.faults (``write/<file>:enospc`` raises the
OSError a full disk raises, while the file's temporary copy exists; ``:kill`` and ``:wait`` as in
tests/test_faults.py), never by sleeping. After each, the command safecl names finishes the run,
and every stage's mask and adapter equal an uninterrupted run's bit for bit.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from safecl import faults
from safecl.cli import main
from safecl.integrity import verify_run
from tests.conftest import ROOT, SMOKE, two_stage_smoke

FAST = ["train.max_steps=4", "train.checkpoint_every=2", "adapter.calibration_steps=1", "retention.harmful.limit=2",
        "retention.benign.limit=2", "retention.max_new_tokens=2", "stages.1.eval.limit=2",
        "retention.bootstrap_samples=50"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The smoke recipe cut to its safety and arithmetic stages."""
    return two_stage_smoke(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(recipe, out) == 0
    return out


def train(recipe, out, *extra, fault=None) -> int:
    faults.reset()
    if fault:
        os.environ["SAFECL_FAULT"] = fault
    try:
        return main(["train", str(recipe), f"output_dir={out}", *FAST, *extra])
    finally:
        os.environ.pop("SAFECL_FAULT", None)
        faults.reset()


def cli(recipe, out, env):
    return subprocess.Popen([sys.executable, "-m", "safecl", "train", str(recipe), f"output_dir={out}", *FAST],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def assert_same_run(out, reference, stages=("safety", "arithmetic")):
    for d in [f"{i:02d}-{name}" for i, name in enumerate(stages)]:
        for rel in ("mask.safetensors", "adapter/adapter_model.safetensors"):
            ref, got = load_file(reference / "stages" / d / rel), load_file(out / "stages" / d / rel)
            assert ref.keys() == got.keys(), f"{d}/{rel}"
            for name in ref:
                assert torch.equal(ref[name], got[name]), f"{d}/{rel}: {name} differs from the uninterrupted run"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and [s["name"] for s in info["stages"]] == list(stages)


def leftovers(out):
    """Temporary files or folders of a failed write (atomic writes remove theirs)."""
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp") or "-" in p.name and p.is_dir()
            if "mlartifacts" not in p.parts]


# (fault, the file the message names): every kind of file safecl writes during a run
FULL_DISK = [
    ("write/mlflow.db:enospc", "mlflow.db"),  # the store's creation
    ("write/mlflow.db@6:enospc", "mlflow.db"),  # a logging call, mid-run
    ("write/checkpoint@2:enospc", "stages/01-arithmetic/checkpoint"),  # 1: stage 0's, 2: stage 1's
    ("write/adapter@1:enospc", "stages/00-safety/adapter"),
    ("write/mask.safetensors@4:enospc", "stages/01-arithmetic/mask.safetensors"),
    ("write/answers.jsonl@1:enospc", "stages/00-safety/answers.jsonl"),
    ("write/run.json@2:enospc", "run.json"),  # the first stage's commit
    ("write/mlartifacts@3:enospc", "mlartifacts/"),
]


@pytest.mark.parametrize("fault, path", FULL_DISK, ids=[f for f, _ in FULL_DISK])
def test_a_full_disk_at_any_write_then_resume_finishes_identically(fault, path, recipe, reference, tmp_path, capsys):
    out = tmp_path / "run"
    # MLflow off where the fault is not MLflow's: its store costs seconds per run, and no tensor depends on it
    extra = [] if "mlflow" in fault or "mlartifacts" in fault else ["tracking.enabled=false"]
    assert train(recipe, out, *extra, fault=fault) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("safecl: error")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"no space left on device writing {out}/{path}" in lines[0], lines[0]
    assert f"Free space there, then continue with: safecl train {recipe} output_dir={out}" in lines[0]
    assert lines[0].endswith(" ".join(extra + ["--resume"]))
    verify_run(out)  # what was committed before the fault is intact
    assert not leftovers(out), leftovers(out)
    assert train(recipe, out, *extra, "--resume") == 0
    assert_same_run(out, reference)


def test_a_full_disk_while_writing_the_audit_report_names_it_and_the_command_again(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    faults.reset()
    os.environ["SAFECL_FAULT"] = "write/report.html:enospc"
    try:
        assert main(["audit", str(run), "--report"]) == 2
    finally:
        os.environ.pop("SAFECL_FAULT")
        faults.reset()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"no space left on device writing {run}/report/report.html" in err
    assert f"then run again: safecl audit {run} --report" in err
    assert not (run / "report" / "report.html").exists() and not list((run / "report").glob(".*.tmp"))
    assert main(["audit", str(run), "--report"]) == 0
    assert (run / "report" / "report.html").is_file()


def mlflow_runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("safecl").experiment_id])


def test_an_audit_beside_a_live_run_reads_only_committed_stages_then_a_kill_leaves_mlflow_runs_ended_killed(
        recipe, reference, tmp_path, capsys):
    """A live run waits where stage 0's adapter is written and its mask, metrics and commit are
    not: the audit (text, JSON, --report) lists the stage as in progress and reads none of its
    files. Then the run is SIGKILLed there: its MLflow runs stay RUNNING until --resume ends them
    KILLED (the audit says so), and the resumed run ends bit-identical to an uninterrupted one."""
    out, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    live = cli(recipe, out, {"SAFECL_FAULT": "commit.adapter:wait", "SAFECL_FAULT_DIR": str(signals)})
    try:
        while not (signals / "commit.adapter.reached").exists():  # an event, polled
            assert live.poll() is None, live.stderr.read()
            time.sleep(0.02)
        assert (out / "stages" / "00-safety" / "adapter" / "adapter_model.safetensors").is_file()
        capsys.readouterr()
        assert main(["audit", str(out), "--json"]) == 0
        a = json.loads(capsys.readouterr().out)["runs"][0]
        assert a["status"] == "running" and [r["checkpoint"] for r in a["matrix"]] == ["base"]
        assert [(s["name"], s["state"]) for s in a["stages"]] == [("safety", "started"), ("arithmetic", "pending")]
        assert a["stages"][0]["verdict"] == "in progress" and not a["warnings"]
        assert main(["audit", str(out), f"--report={tmp_path / 'report'}"]) == 0
        assert (tmp_path / "report" / "report.html").is_file()
        _, runs = mlflow_runs(out)
        assert sorted((r.info.run_name, r.info.status) for r in runs) == [("00-safety", "RUNNING"), ("run", "RUNNING")]
        lost = next(r.info.run_id for r in runs if r.info.run_name == "00-safety")
    finally:
        live.kill()  # a real SIGKILL, at the wait
        live.communicate(timeout=60)
    assert live.returncode == -9
    capsys.readouterr()
    assert train(recipe, out, "--resume") == 0
    assert_same_run(out, reference)
    client, runs = mlflow_runs(out)
    status = {(r.info.run_name, r.info.run_id): r.info.status for r in runs}
    assert status.pop(("00-safety", lost)) == "KILLED"  # the lost attempt, kept as a record
    assert sorted(status.values()) == ["FINISHED"] * 3  # parent, a fresh 00-safety, 01-arithmetic
    assert "left RUNNING" in client.get_run(lost).data.tags["safecl.ended"]
    killed = json.loads((out / "run.json").read_text())["mlflow"]["killed"]
    assert [(k["run_name"], k["stage"]) for k in killed] == [("00-safety", "safety"), ("run", None)]
    capsys.readouterr()
    assert main(["audit", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MLflow run 00-safety (stage 'safety') was left RUNNING by an interrupted process; ended KILLED" in text
    assert "MLflow run run (the parent run) was left RUNNING" in text
    assert main(["audit", str(out), "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["runs"][0]
    assert len(a["mlflow_killed"]) == 2 and [s["state"] for s in a["stages"]] == ["checked", "checked"]


@pytest.fixture(scope="module")
def sequel(tmp_path_factory):
    """Another task sequence on the same safety stage: safety, then sentiment."""
    data = yaml.safe_load(SMOKE.read_text())
    data["stages"] = [data["stages"][0], data["stages"][2]]
    path = tmp_path_factory.mktemp("recipe") / "sequel.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def adopted(sequel, reference, tmp_path_factory):
    """The sequel started from the reference's safety stage, uninterrupted."""
    out = tmp_path_factory.mktemp("adopted") / "run"
    assert train(sequel, out, "--from", f"{reference}:safety") == 0
    return out


@pytest.mark.parametrize("fault", ["adopt.copy@3:interrupt", "adopt.copy@2:kill", "write/00-safety:kill"])
def test_a_from_interrupted_while_it_copies_then_the_next_command_finishes_identically(
        fault, sequel, reference, adopted, tmp_path, capsys):
    out = tmp_path / "run"
    start = ["--from", f"{reference}:safety"]
    if fault.endswith(":kill"):  # SIGKILL-like: no finally, no cleanup, a half-copied file or folder left behind
        proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(sequel), f"output_dir={out}", *FAST, *start],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "SAFECL_FAULT": fault},
                              timeout=600)
        assert proc.returncode == 137
        assert list((out / "stages").glob(".00-safety-*")) and not (out / "run.json").exists()
        assert train(sequel, out, *start) == 0  # the same command again
    else:
        assert train(sequel, out, *start, fault=fault) == 130
        err = capsys.readouterr().err
        named = f"Continue with: safecl train {sequel} output_dir={out} {' '.join(FAST)} {' '.join(start)} --resume"
        assert "Traceback" not in err and named in err
        assert not (out / "stages" / "00-safety").exists()  # never half a stage under its name
        assert train(sequel, out, *start, "--resume") == 0  # the command it named
    assert_same_run(out, adopted, stages=("safety", "sentiment"))
    ref = load_file(reference / "stages/00-safety/mask.safetensors")
    assert all(torch.equal(ref[k], v) for k, v in load_file(out / "stages/00-safety/mask.safetensors").items())
    info = json.loads((out / "run.json").read_text())
    assert info["started_from"]["stage"] == "safety" and info["stages"][0]["adopted_from"] == str(reference)
