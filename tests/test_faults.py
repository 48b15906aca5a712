"""Interrupt anywhere, corrupt anything, run twice: the next command finishes the run.

Faults are injected at named points (safecl.faults, ``SAFECL_FAULT``), never by sleeping: an
interrupt (KeyboardInterrupt, what Ctrl-C raises) in-process, a hard exit (``os._exit``, what
SIGKILL leaves) in a real ``safecl train`` process. After each, the command safecl names
finishes the run, and every stage's mask and adapter equal an uninterrupted run's bit for bit.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from safecl import faults
from safecl.cli import main
from tests.conftest import ROOT, two_stage_smoke

FAST = ["train.max_steps=6", "train.checkpoint_every=2", "retention.harmful.limit=4", "retention.benign.limit=4",
        "retention.max_new_tokens=4", "stages.1.eval.limit=4"]
STAGES = ["00-safety", "01-arithmetic"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The smoke recipe cut to its safety and arithmetic stages."""
    return two_stage_smoke(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(recipe, out) == 0
    return out


def train(recipe, out, *extra, fault=None, monkeypatch=None) -> int:
    faults.reset()
    if fault:
        monkeypatch.setenv("SAFECL_FAULT", fault)
    try:
        return main(["train", str(recipe), f"output_dir={out}", *FAST, *extra])
    finally:
        if fault:
            monkeypatch.delenv("SAFECL_FAULT")


def tensors(out):
    got = {}
    for d in STAGES:
        got[f"{d}/mask"] = load_file(out / "stages" / d / "mask.safetensors")
        got[f"{d}/adapter"] = load_file(out / "stages" / d / "adapter" / "adapter_model.safetensors")
    return got


def assert_same_run(out, reference):
    ref, got = tensors(reference), tensors(out)
    for key in ref:
        assert ref[key].keys() == got[key].keys(), key
        for name in ref[key]:
            assert torch.equal(ref[key][name], got[key][name]), f"{key}: {name} differs from the uninterrupted run"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and [s["name"] for s in info["stages"]] == ["safety", "arithmetic"]
    for d in STAGES:  # every answer once: nothing lost, nothing doubled by the resume
        evals = json.loads((out / "stages" / d / "metrics.json").read_text())["retention"]["evals"]
        rows = [json.loads(x) for x in (out / "stages" / d / "answers.jsonl").read_text().splitlines()]
        assert len(rows) == sum(e["n"] for e in evals if not e["name"].startswith("nll:"))


@pytest.mark.parametrize("point", ["store", "store.migrated", "started", "step@4", "check@2", "commit.adapter",
                                   "commit.files@2", "end"])
def test_interrupt_at_any_point_then_resume_finishes_identically(point, recipe, reference, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "run"
    assert train(recipe, out, fault=point, monkeypatch=monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"Continue with: safecl train {recipe} output_dir={out}" in err
    assert train(recipe, out, "--resume") == 0
    assert_same_run(out, reference)


def cli(recipe, out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "safecl", "train", str(recipe), f"output_dir={out}", *FAST, *extra],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("point", ["store.migrated", "commit.adapter"])  # mid-stage: tests/test_resume.py
def test_hard_kill_then_resume_finishes_identically_and_the_lock_is_not_stale(point, recipe, reference, tmp_path):
    out = tmp_path / "run"
    proc = cli(recipe, out, env={"SAFECL_FAULT": f"{point}:kill"})
    assert proc.returncode == 137
    holder = json.loads((out / ".lock").read_text())
    assert holder["pid"] != os.getpid()  # the dead process's lock file is still there ...
    assert train(recipe, out, "--resume") == 0  # ... and blocks nothing
    assert_same_run(out, reference)


def test_a_second_process_is_refused_while_the_first_creates_its_store(recipe, reference, tmp_path, capsys):
    out, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    first = subprocess.Popen([sys.executable, "-m", "safecl", "train", str(recipe), f"output_dir={out}", *FAST],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "SAFECL_FAULT": "store:wait", "SAFECL_FAULT_DIR": str(signals)})
    try:
        while not (signals / "store.reached").exists():  # an event, polled (the process starts up meanwhile)
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.02)
        for extra in ([], ["--resume"]):
            assert train(recipe, out, *extra) == 2
            err = capsys.readouterr().err
            assert f"is in use by process {first.pid}" in err and "since" in err and "Traceback" not in err
    finally:
        (signals / "store.release").write_text("go")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert_same_run(out, reference)


@pytest.mark.parametrize("damage", ["01-arithmetic/mask.safetensors", "01-arithmetic/adapter/adapter_model.safetensors",
                                    "00-safety/metrics.json"])
def test_a_truncated_committed_file_is_named_and_the_named_command_repairs_the_run(damage, recipe, reference, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    path = out / "stages" / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    stage = damage.split("/")[0].split("-", 1)[1]
    for argv in (["train", str(recipe), f"output_dir={out}", *FAST, "--resume"], ["audit", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"stage '{stage}' is damaged: {path}" in err and f"--restart-from {stage}" in err and "Traceback" not in err
    before = load_file(out / "stages/00-safety/mask.safetensors")
    assert train(recipe, out, "--resume", "--restart-from", stage) == 0
    assert_same_run(out, reference)
    if stage != "safety":  # the stages before the restart stay as committed
        assert torch.equal(before["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           load_file(out / "stages/00-safety/mask.safetensors")[
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_audit_reads_a_run_interrupted_mid_stage(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(recipe, out, fault="step@9", monkeypatch=monkeypatch) == 130
    capsys.readouterr()
    assert main(["audit", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = json.dumps(doc)
    assert "safety" in text and "arithmetic" in text


def test_fault_spec_errors_name_the_points():
    with pytest.raises(ValueError, match="POINT one of store, store.migrated"):
        faults.parse("nowhere:kill")
    assert faults.parse("step@3:kill") == ("step", 3, "kill")


def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_at_the_next_safe_point(capsys):
    """Python drops an exception raised inside __del__ (printing a traceback): under the guard the
    interrupt is remembered, not printed, and the next fault point raises it."""
    import gc
    import signal

    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    faults.reset()
    try:
        # a known start: an in-process `safecl train` earlier in the session leaves its guard installed
        signal.signal(signal.SIGINT, signal.default_int_handler)
        faults.guard_interrupts()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler

        class Finalized:
            def __del__(self):
                # raised in this thread (os.kill may land on another thread, whose wake-up can come
                # after __del__ has returned), handled at the next bytecode inside __del__
                signal.raise_signal(signal.SIGINT)
                for _ in range(1000):
                    pass

        Finalized()
        gc.collect()
        assert "Traceback" not in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            faults.fault_point("step")
        faults.fault_point("step")  # raised once
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = hook
        faults.reset()
