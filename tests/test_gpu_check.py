"""benchmarks/gpu_check.py reads a run's invariants from its files: it passes a real run, and it
catches each kind of break (an earlier stage's entry moved, B written outside the masks, A
changed, overlapping masks) on a copy edited on purpose. The run records where it trained."""

import importlib.util
import json
import shutil

from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, train_smoke

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

FAST = ["train.max_steps=3", "adapter.calibration_steps=1", "retention.harmful.limit=2", "retention.benign.limit=2",
        "retention.max_new_tokens=2", "stages.1.eval.limit=2", "stages.2.eval.limit=2", "tracking.enabled=false"]


def _edit(run, stage: str, fn, name: str = "adapter/adapter_model.safetensors"):
    path = run / "stages" / stage / name
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_the_check_passes_a_run_and_catches_each_break(tmp_path_factory, tmp_path):
    run = train_smoke(tmp_path_factory, "gpucheck", FAST)
    assert gpu_check.check_run(run) == []
    assert json.loads((run / "run.json").read_text())["device"] == "cpu"

    def key(t, which):
        return next(k for k in t if k.endswith(f"lora_{which}.weight"))

    def moved_earlier(t):  # stage 1's adapter changes an entry that stage 0 owns
        mask = load_file(run / "stages" / "00-safety" / "mask.safetensors")
        k = next(k for k in mask if mask[k].any())
        t[k].view(-1)[mask[k].view(-1).nonzero()[0]] += 1.0

    def outside(t):  # B written where no stage owns an entry
        masks = [load_file(run / "stages" / d / "mask.safetensors") for d in ("00-safety", "01-arithmetic")]
        k = key(t, "B")
        free = ~(masks[0][k] | masks[1][k])
        t[k].view(-1)[free.view(-1).nonzero()[0]] = 0.5

    def a_changed(t):
        t[key(t, "A")][0, 0] += 1e-3

    cases = [(moved_earlier, "changed entries of stage 0"), (outside, "non-zero outside"),
             (a_changed, "is not the seeded projection")]
    for fn, message in cases:
        broken = tmp_path / fn.__name__
        shutil.copytree(run, broken)
        _edit(broken, "01-arithmetic", fn)
        assert any(message in e for e in gpu_check.check_run(broken)), fn.__name__

    overlap = tmp_path / "overlap"
    shutil.copytree(run, overlap)
    earlier = load_file(run / "stages" / "00-safety" / "mask.safetensors")
    _edit(overlap, "01-arithmetic", lambda t: t.update({k: t[k] | earlier[k] for k in t}), "mask.safetensors")
    assert any("overlaps stage 0" in e for e in gpu_check.check_run(overlap))
