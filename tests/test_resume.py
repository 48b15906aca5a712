"""Crash and resume: a run killed with SIGKILL mid-stage and resumed ends with the same masks,
adapters, losses and retention numbers as an uninterrupted run; unsafe recipe changes are
refused on resume; a non-finite loss stops the stage with a clear message."""

import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SMOKE

FAST = ["train.checkpoint_every=4", "train.max_steps=12", "retention.harmful.limit=4", "retention.benign.limit=4",
        "stages.1.eval.limit=4", "stages.2.eval.limit=4"]


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "safecl", "train", str(SMOKE), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


KEEP_SAFETY = ["stages.1.anchor={limit: 8, tokens: 4}", "stages.1.replay={share: 0.2, distill: 1.0}",
               "stages.2.anchor={limit: 8, tokens: 4}"]


def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tmp_path):
    _kill_and_resume(tmp_path, FAST)


def test_sigkill_mid_stage_with_anchors_and_replay_resumes_identically(tmp_path):
    """The anchors' teacher answers, their batches and the replay mix are rebuilt identically on
    resume, so losses, anchor-term values, masks and adapters match the uninterrupted run."""
    ref, cut = _kill_and_resume(tmp_path, FAST + KEEP_SAFETY)
    for d in ["01-arithmetic", "02-sentiment"]:
        ma, mb = (json.loads((x / "stages" / d / "metrics.json").read_text()) for x in (ref, cut))
        assert set(ma["train"]["terms"]) >= {"anchor_kl"}
        for name, term in ma["train"]["terms"].items():
            assert term["values"] == mb["train"]["terms"][name]["values"] and len(term["values"]) == 12
        assert ma["mechanisms"]["anchor"]["anchors"] == mb["mechanisms"]["anchor"]["anchors"] == 8
        # the teacher cache was built in both runs (after the kill: rebuilt at the resumed step)
        assert ma["mechanisms"]["anchor"]["teacher_cache"]["teacher"] == "cached"
        assert mb["mechanisms"]["anchor"]["teacher_cache"]["teacher"] == "cached"


def _kill_and_resume(tmp_path, overrides):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    FAST = overrides
    rc, _, err = finish(cli(f"output_dir={ref}", *FAST))
    assert rc == 0, err[-2000:]

    proc = cli(f"output_dir={cut}", *FAST)
    marker = cut / "stages" / "01-arithmetic" / "checkpoint" / "state.pt"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-stage"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = json.loads((cut / "run.json").read_text())
    assert run["status"] == "running" and [s["name"] for s in run["stages"]] == ["safety"]

    rc, out, err = finish(cli(f"output_dir={cut}", *FAST, "--resume"))
    assert rc == 0, err[-2000:]
    assert "already complete" in out and "resuming at step" in out
    for d in ["00-safety", "01-arithmetic", "02-sentiment"]:
        a, b = ref / "stages" / d, cut / "stages" / d
        assert load_file(a / "mask.safetensors").keys() == load_file(b / "mask.safetensors").keys()
        for name in ["mask.safetensors", "adapter/adapter_model.safetensors"]:
            ta, tb = load_file(a / name), load_file(b / name)
            assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{d}/{name} differs"
        ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
        assert ma["train"]["losses"] == mb["train"]["losses"] and ma["mask"] == mb["mask"]
        assert not (b / "checkpoint").exists()
    ra, rb = (json.loads((x / "retention.json").read_text()) for x in (ref, cut))
    assert ra["rows"] == rb["rows"]
    final = json.loads((cut / "run.json").read_text())
    assert final["status"] == "completed" and final["resumed"] == 1
    assert final["mlflow"]["parent_run_id"] == run["mlflow"]["parent_run_id"]  # the same MLflow run continues
    return ref, cut


def test_resume_refuses_unsafe_changes_and_accepts_eval_changes(tmp_path):
    out = tmp_path / "run"
    rc, _, err = finish(cli(f"output_dir={out}", *FAST, "train.max_steps=2"))
    assert rc == 0, err[-2000:]
    rc, _, err = finish(cli(f"output_dir={out}", *FAST, "train.max_steps=2", "train.lr=0.5", "--resume"))
    assert rc == 2 and "changed keys: train.lr" in err
    rc, _, err = finish(cli(f"output_dir={out}", *FAST, "train.max_steps=2"))
    assert rc == 2 and "already holds a completed run" in err
    rc, out_, err = finish(cli(f"output_dir={out}", *FAST, "train.max_steps=2", "retention.max_new_tokens=4", "--resume"))
    assert rc == 0, err[-2000:]


def test_non_finite_loss_stops_the_stage(tmp_path):
    out = tmp_path / "nan"
    rc, _, err = finish(cli(f"output_dir={out}", *FAST, "train.lr=1e30", "train.max_grad_norm=null",
                            "retention.enabled=false"))
    assert rc == 2 and "loss is nan" in err.lower() or "loss is inf" in err.lower(), err[-1500:]
    assert "Earlier stages' artifacts are intact" in err
