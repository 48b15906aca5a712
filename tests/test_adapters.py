"""LoRI invariants on a real (tiny) run: A frozen, masks disjoint and of the right size,
earlier stages' B entries bit-identical, updates only inside the stage's own mask, PEFT export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from safecl.adapters import seeded_projection
from safecl.adapters.export import load_mask, module_name
from safecl.adapters.masks import global_topk, mask_size
from safecl.recipe import load_recipe
from safecl.training.runner import run_recipe

RECIPE = """\
seed: 1
output_dir: {out}
model: {{name: builtin:tiny-llama}}
adapter: {{method: {method}, rank: 4, alpha: 8, density: 0.2, calibration_steps: 2}}
train: {{lr: 1.0e-2, max_steps: 4, batch_size: 4, max_seq_len: 64, weight_decay: 0.1}}
retention: {{enabled: false}}
stages:
  - {{name: safety, kind: safety, data: {{source: {data}}}}}
  - {{name: t1, kind: task, data: {{source: {data}}}}}
  - {{name: t2, kind: task, data: {{source: {data}}}}}
"""


def run(tmp_path, data, method="lori-s", overrides=()):
    p = tmp_path / f"{method}.yaml"
    p.write_text(RECIPE.format(out=tmp_path / f"run-{method}", method=method, data=data))
    return run_recipe(load_recipe(p, list(overrides)), p, echo=lambda *_: None)


def stage_tensors(out, index, name):
    d = out / "stages" / f"{index:02d}-{name}"
    t = {module_name(k) + (".A" if ".lora_A." in k else ".B"): v for k, v in load_file(d / "adapter" / "adapter_model.safetensors").items()}
    mask = load_mask(d / "mask.safetensors") if (d / "mask.safetensors").exists() else None
    return t, mask, json.loads((d / "metrics.json").read_text())


@pytest.fixture(scope="module")
def lori_s_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lori")
    rows = "".join(json.dumps({"instruction": f"Q{i}: what is {i}+1?", "output": f"It is {i + 1}."}) + "\n" for i in range(32))
    (tmp / "d.jsonl").write_text(rows)
    result = run(tmp, tmp / "d.jsonl")
    names = ["safety", "t1", "t2"]
    return result, [stage_tensors(result.output_dir, i, n) for i, n in enumerate(names)]


def test_A_is_the_seeded_projection_and_never_changes(lori_s_run):
    _, stages = lori_s_run
    for key, A in stages[0][0].items():
        if key.endswith(".A"):
            name = key[:-2]
            assert torch.equal(A, seeded_projection(1, name, 4, A.shape[1]))
            for t, _, _ in stages[1:]:
                assert torch.equal(t[key], A)


def test_masks_disjoint_and_sized(lori_s_run):
    _, stages = lori_s_run
    masks = [m for _, m, _ in stages]
    total = sum(m.numel() for m in masks[0].values())
    for m in masks:
        assert sum(int(x.sum()) for x in m.values()) == mask_size(0.2, total)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not any((masks[i][n] & masks[j][n]).any() for n in masks[i])


def test_earlier_entries_bit_identical_and_updates_inside_mask(lori_s_run):
    _, stages = lori_s_run
    prev = {k: torch.zeros_like(v) for k, v in stages[0][0].items() if k.endswith(".B")}
    owned = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in prev.items()}
    changed_any = False
    for tensors, mask, _ in stages:
        for key in prev:
            B = tensors[key]
            m = mask[key[:-2]]
            changed = B != prev[key]
            assert not (changed & ~m).any(), f"{key}: an entry outside this stage's mask changed"
            assert torch.equal(B[owned[key]], prev[key][owned[key]]), f"{key}: an earlier stage's entry moved"
            changed_any |= bool(changed.any())
            owned[key] |= m
            prev[key] = B
    assert changed_any  # weight decay 0.1 is on: frozen entries must still not move


def test_trainable_params_and_optimizer_state_scale_with_mask(lori_s_run):
    _, stages = lori_s_run
    for _, mask, metrics in stages:
        entries = sum(int(m.sum()) for m in mask.values())
        assert metrics["trainable_params"] == entries == metrics["mask"]["entries"]
        assert metrics["train"]["optimizer_state_bytes"] == 2 * 4 * entries  # AdamW exp_avg + exp_avg_sq, fp32


def test_peft_adapter_reproduces_in_memory_logits(lori_s_run):
    from peft import PeftModel

    from safecl.models import load_model_and_tokenizer
    from safecl.recipe.schema import ModelConfig

    result, _ = lori_s_run
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        ours = result.model(input_ids=ids).logits
        base, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), seed=1)
        plain = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, result.output_dir / "stages" / "02-t2" / "adapter")
        theirs = peft_model(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_global_topk_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(6, 3, generator=gen), "b": torch.rand(4, 3, generator=gen)}
    free = {"a": torch.rand(6, 3, generator=gen) > 0.3, "b": torch.rand(4, 3, generator=gen) > 0.3}
    k = 7
    mask = global_topk(scores, free, k)
    flat = [(float(scores[n].flatten()[i]), n, i) for n in scores for i in range(scores[n].numel()) if free[n].flatten()[i]]
    expected = sorted(flat, reverse=True)[:k]
    got = {(n, i) for n in mask for i in mask[n].flatten().nonzero().flatten().tolist()}
    assert got == {(n, i) for _, n, i in expected}


def test_overlap_mode_reproduces_reference_overlap(tmp_path, arithmetic_file):
    result = run(tmp_path, arithmetic_file, overrides=["adapter.disjoint=false", "adapter.density=0.6"])
    m0 = load_mask(result.output_dir / "stages" / "00-safety" / "mask.safetensors")
    m1 = load_mask(result.output_dir / "stages" / "01-t1" / "mask.safetensors")
    assert any((m0[n] & m1[n]).any() for n in m0)  # 0.6 + 0.6 > 1: must overlap


@pytest.mark.parametrize("method,a_trains", [("lori-d", False), ("lora", True)])
def test_dense_methods(tmp_path, arithmetic_file, method, a_trains):
    result = run(tmp_path, arithmetic_file, method=method)
    s0, _, m0 = stage_tensors(result.output_dir, 0, "safety")
    s2, _, _ = stage_tensors(result.output_dir, 2, "t2")
    key = next(k for k in s0 if k.endswith(".A"))
    assert torch.equal(s0[key], s2[key]) != a_trains
    B_numel = sum(v.numel() for k, v in s0.items() if k.endswith(".B"))
    A_numel = sum(v.numel() for k, v in s0.items() if k.endswith(".A"))
    assert m0["trainable_params"] == B_numel + (A_numel if a_trains else 0)


@pytest.mark.parametrize("method", ["lori-s", "lora"])
def test_low_rank_function_equals_autograd_in_value_and_gradients(method):
    """The hand-written low-rank function (adapters/layer.py, _LowRankLinear): the output and the
    gradients of the input and of every trained tensor (B's entries; A too for lora) equal
    autograd's on W x + s B (A x) within float error, for a 3-d input with a bias."""
    import torch.nn.functional as F

    from safecl.adapters.layer import LoRILinear, _LowRankLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    for p in base.parameters():
        p.requires_grad_(False)
    layer = LoRILinear(base, "m", rank=4, alpha=8, seed=0, train_A=method == "lora")
    with torch.no_grad():
        layer.B_frozen.normal_()
    if method == "lora":
        layer.begin_dense()
        with torch.no_grad():
            layer.delta.normal_()
        trained = [layer.A, layer.delta]
    else:
        layer.begin_sparse(torch.rand(40, 4) < 0.3)
        with torch.no_grad():
            layer.values.add_(torch.randn_like(layer.values))
        trained = [layer.values]
    x = torch.randn(3, 7, 24, requires_grad=True)
    calls = []
    hook = _LowRankLinear.apply
    _LowRankLinear.apply = lambda *a: calls.append(1) or hook(*a)
    try:
        out = layer(x)
    finally:
        _LowRankLinear.apply = hook
    assert calls, "the layer did not take the hand-written path"
    got = torch.autograd.grad(out.pow(2).sum(), [x, *trained])
    x2 = x.detach().clone().requires_grad_(True)
    ref_trained = [t.detach().clone().requires_grad_(True) for t in trained]
    if method == "lora":
        A, B = ref_trained[0], layer.B_frozen + ref_trained[1]
    else:
        A = layer.A
        B = layer.B_frozen.flatten().scatter(0, layer.index, ref_trained[0]).view_as(layer.B_frozen)
    ref = base(x2) + layer.scaling * F.linear(F.linear(x2, A), B)
    want = torch.autograd.grad(ref.pow(2).sum(), [x2, *ref_trained])
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-4, rtol=1e-5)
