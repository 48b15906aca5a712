"""benchmarks/scale_8b.py: the Llama-3-8B budget against known counts, and the measured path runs."""

import importlib.util

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("scale_8b", ROOT / "benchmarks" / "scale_8b.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def test_the_8b_shape_has_its_published_sizes():
    assert round(scale.base_params(scale.LLAMA3_8B) / 1e9, 2) == 8.03  # Llama-3-8B: 8.03B parameters
    # PEFT LoRA r=32 on all seven projections of Llama-3-8B: 83,886,080 trainable parameters
    lora = scale.budget(scale.LLAMA3_8B, "lora", 32, 0.1, 4, 512)
    assert lora["trainable_params"] == 83_886_080 and lora["adamw_state"] == 8 * 83_886_080
    lori_s = scale.budget(scale.LLAMA3_8B, "lori-s", 32, 0.1, 4, 512)
    lori_d = scale.budget(scale.LLAMA3_8B, "lori-d", 32, 0.1, 4, 512)
    assert lori_s["trainable_params"] == int(0.1 * lori_d["trainable_params"])
    assert lori_s["activations_checkpointed"] < lori_s["activations"]


def test_the_measured_path_runs_on_the_small_shape(capsys):
    assert scale.main(["--steps", "1", "--seq", "16", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "total, checkpointing (GB)" in out and "lori-s" in out and "ratios to lora" in out
    measured = out.split("measured on")[1].splitlines()
    rows = [line.split() for line in measured if line.strip().startswith(("lora ", "lori-d ", "lori-s "))]
    assert [r[0] for r in rows] == ["lora", "lori-d", "lori-s"]
    state = {r[0]: float(r[4]) for r in rows}  # optimizer MB: AdamW keeps 2 fp32 values per trainable entry
    assert state["lori-s"] < state["lori-d"] < state["lora"]


@pytest.mark.parametrize("method", scale.METHODS)
def test_measured_optimizer_state_is_8_bytes_per_trainable_parameter(method):
    r = scale.measure(scale.SMALL, method, 8, 0.1, 1, 8, 1, "cpu", scale.torch.float32)
    # exp_avg and exp_avg_sq in fp32 per trainable entry, plus AdamW's 4-byte step per tensor
    assert r["optimizer_state_bytes"] == 8 * r["trainable"] + 4 * r["tensors"]
