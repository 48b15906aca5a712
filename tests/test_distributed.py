"""Data parallel and FSDP2 on CPU (gloo): `safecl train --num-processes 2` re-launches itself
through accelerate, finishes, and finds the same masks as a 1-process run, with the same losses;
the retention check, split across the two processes and gathered, gives the same matrix. Under
FSDP2 (accelerate_configs/fsdp_cpu.yaml) the base weights are really sharded, the written
adapters equal the 1-process run's within 1e-6, and a run SIGKILLed mid-stage and resumed under
FSDP ends bit-identical to an uninterrupted FSDP run; so does one where only one rank is
SIGKILLed (the other exits: no hang)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, SMOKE

ARGS = ["train.max_steps=6", "tracking.enabled=false", "retention.harmful.limit=5", "retention.benign.limit=3",
        "retention.max_new_tokens=6"]


STAGES = ["00-safety", "01-arithmetic", "02-sentiment"]
FSDP = ["--num-processes", "2", "--accelerate-config", str(ROOT / "accelerate_configs" / "fsdp_cpu.yaml")]


def _train(out, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "safecl", "train", str(SMOKE), f"output_dir={out}", *ARGS, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    proc = _train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = _train(out, *FSDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _same_masks_and_losses(one, other, stage: str, tolerance: float) -> None:
    a, b = (load_file(r / "stages" / stage / "mask.safetensors") for r in (one, other))
    assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: masks differ from the 1-process run's"
    la, lb = (json.loads((r / "stages" / stage / "metrics.json").read_text())["train"]["losses"] for r in (one, other))
    assert max(abs(x - y) for x, y in zip(la, lb)) < tolerance


def _adapter(run, stage):
    return load_file(run / "stages" / stage / "adapter" / "adapter_model.safetensors")


def _same_rows(ra: dict, rb: dict) -> None:
    """Equal verdicts and task scores; the gold-answer NLLs (continuous) of weights that agree to
    1e-4 agree to 1e-3."""
    assert [r["stage"] for r in ra["rows"]] == [r["stage"] for r in rb["rows"]]
    for a, b in zip(ra["rows"], rb["rows"]):
        split = lambda row, nll: {k: v for k, v in row["scores"].items() if k.startswith("nll:") == nll}  # noqa: E731
        assert split(a, False) == split(b, False)
        assert split(a, True) == pytest.approx(split(b, True), abs=1e-3) and split(a, True)


def test_two_processes_match_one(tmp_path, one):
    two = tmp_path / "two"
    proc = _train(two, "--num-processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relaunching" in proc.stdout and proc.stdout.count("run completed") == 1  # only rank 0 reports
    for d in STAGES:
        _same_masks_and_losses(one, two, d, 1e-4)
    ra, rb = (json.loads((d / "retention.json").read_text()) for d in (one, two))
    assert [r["stage"] for r in rb["rows"]] == ["base", "safety", "arithmetic", "sentiment"]
    _same_rows(ra, rb)
    ev = json.loads((two / "stages" / "02-sentiment" / "metrics.json").read_text())["retention"]["evals"]
    assert [e["n"] for e in ev] == [5, 3, 8, 8, 8, 8]  # odd counts: both shards gathered, nothing lost or doubled


def test_gate_halt_stops_every_process_with_exit_3(tmp_path):
    from tests.test_gate_actions import PHRASES, RECIPE

    recipe = tmp_path / "halt.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "run", phrases=PHRASES, action="halt", after="continue")
                      .replace("max_new_tokens: 6", "max_new_tokens: 6\n  do_sample: true"))
    proc = subprocess.run([sys.executable, "-m", "safecl", "train", str(recipe), "--num-processes", "2",
                           "tracking.enabled=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "halted"


def test_fsdp2_shards_the_base_and_matches_one_process(one, fsdp):
    run, stdout = fsdp
    assert "FSDP2: base weights sharded over 2 processes" in stdout and stdout.count("run completed") == 1
    held, total = (int(x.replace(",", "")) for x in stdout.split("rank 0 holds ")[1].split(" entries")[0].split(" of "))
    assert abs(held / total - 0.5) < 0.01  # each rank holds half of the base weights
    assert json.loads((run / "run.json").read_text())["device"] == "cpu x 2 processes, FSDP2"
    for d in STAGES:
        _same_masks_and_losses(one, run, d, 1e-5)
        pa, pb = _adapter(one, d), _adapter(run, d)
        # the full PEFT adapter (every module's A and B, whole shapes), not a rank's shard
        assert set(pa) == set(pb) and all(pa[k].shape == pb[k].shape for k in pa)
        assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-6
    # the check split across ranks and gathered: same matrix, odd counts neither lost nor doubled
    ra, rb = (json.loads((d / "retention.json").read_text()) for d in (one, run))
    _same_rows(ra, rb)
    ev = json.loads((run / "stages" / "02-sentiment" / "metrics.json").read_text())["retention"]["evals"]
    assert [e["n"] for e in ev] == [5, 3, 8, 8, 8, 8]
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.check_run(run) == []  # disjoint masks, A seeded, earlier entries bit-identical, B zero elsewhere


def test_fsdp2_sigkill_mid_stage_then_resume_equals_uninterrupted(tmp_path, fsdp):
    run = tmp_path / "killed"
    env = {**os.environ, "SAFECL_FAULT": "step@13:kill"}  # both ranks: stage 1, step 3 (2 calibration steps a stage)
    proc = _train(run, *FSDP, "train.checkpoint_every=2", env=env)
    assert proc.returncode != 0 and json.loads((run / "run.json").read_text())["status"] == "running"
    done = [s["name"] for s in json.loads((run / "run.json").read_text())["stages"]]
    assert done == ["safety"]
    proc = _train(run, *FSDP, "train.checkpoint_every=2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step" in proc.stdout
    ref = fsdp[0]
    for d in STAGES:
        a, b = _adapter(ref, d), _adapter(run, d)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{d}: resumed FSDP run differs from the uninterrupted one"
        la = json.loads((ref / "stages" / d / "metrics.json").read_text())["train"]["losses"]
        lb = json.loads((run / "stages" / d / "metrics.json").read_text())["train"]["losses"]
        assert la == lb


def test_deepspeed_and_fsdp1_configs_are_refused_before_launch(tmp_path, capsys):
    from safecl.cli import main

    cases = {"zero.yaml": ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n", "DeepSpeed (ZeRO)"),
             "fsdp1.yaml": ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 1}\n", "fsdp_version is 1")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        rc = main(["train", str(SMOKE), "--num-processes", "2", "--accelerate-config", str(tmp_path / name),
                   f"output_dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and str(tmp_path / name) in err
        assert not (tmp_path / "run").exists()  # nothing launched


def _resumed_equals(run, ref):
    proc = _train(run, *FSDP, "train.checkpoint_every=2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step" in proc.stdout
    for d in STAGES:
        a, b = _adapter(ref, d), _adapter(run, d)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{d}: resumed FSDP run differs from the uninterrupted one"


def test_fsdp2_one_rank_sigkilled_mid_stage_the_other_exits_then_resume_equals_uninterrupted(tmp_path, fsdp):
    """Only rank 1 dies (SIGKILL-like, mid-stage 1): rank 0 fails its next collective (the dead
    peer's sockets close) and exits, the launcher exits non-zero; nothing hangs."""
    run = tmp_path / "killed"
    env = {**os.environ, "SAFECL_FAULT": "step@13:kill", "SAFECL_FAULT_RANK": "1", "SAFECL_COLLECTIVE_TIMEOUT": "60"}
    proc = _train(run, *FSDP, "train.checkpoint_every=2", env=env)  # subprocess timeout: 600 s, a hang fails here
    assert proc.returncode != 0
    assert [s["name"] for s in json.loads((run / "run.json").read_text())["stages"]] == ["safety"]
    _resumed_equals(run, fsdp[0])


def test_sigint_to_the_launcher_with_a_hung_rank_ends_every_process_and_names_the_resume(tmp_path):
    """Rank 1 hangs (alive, in a wait) right after the start while rank 0 waits for it in a
    collective; SIGINT to `safecl train --num-processes 2` alone (not its workers) ends them all
    and names the command that continues (the resume itself: the SIGKILL test above)."""
    import signal
    import time

    run, signals = tmp_path / "hung", tmp_path / "signals"
    signals.mkdir()
    env = {**os.environ, "SAFECL_FAULT": "started:wait", "SAFECL_FAULT_RANK": "1", "SAFECL_FAULT_DIR": str(signals),
           "SAFECL_COLLECTIVE_TIMEOUT": "120"}
    launcher = subprocess.Popen([sys.executable, "-m", "safecl", "train", str(SMOKE), f"output_dir={run}", *ARGS, *FSDP],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True,
                                # a suite started in the background (`make test &`) inherits SIGINT ignored,
                                # and an ignored signal stays ignored across exec: give the launcher Ctrl-C back
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not (signals / "started.reached").exists():  # an event, polled
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.05)
        hung = int((signals / "started.reached").read_text())
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=300)  # returns once every process holding its pipes has exited
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130 and not _alive(hung)
    assert f"Continue with: safecl train {SMOKE} output_dir={run}" in err and err.rstrip().endswith("--resume")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
