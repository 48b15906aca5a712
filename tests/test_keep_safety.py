"""The mechanisms that keep safety through task stages: their invariants on tiny models.

replay: counts and seeding; anchors: the teacher is the model before the stage bit for bit;
safety merge: only the stage's own entries move; safety-aware allocation: k free entries,
low-sensitivity entries preferred; refusal direction: difference of means, file round trip.
"""

import pytest
import torch

from safecl.adapters import inject_adapters, snapshot, stage_switched_off, trainable_parameters
from safecl.adapters.allocation import allocate, safety_aware_scores
from safecl.adapters.conflict import merge_conflicts, update_cosine
from safecl.data.formatting import collate
from safecl.data.records import Example
from safecl.data.replay import mix_replay, replay_count
from safecl.safety.anchors import KLAnchor, anchor_kl, encode_anchor, step_batch
from safecl.safety.direction import last_token_states, load_direction, project, refusal_direction, save_direction

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ex(i, tag):
    return Example(messages=[{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": f"ok {i}"}])


# -- replay -------------------------------------------------------------------------------------
def test_replay_counts_share_and_seed():
    task = [_ex(i, "task") for i in range(300)]
    pool = [_ex(i, "safety") for i in range(400)]
    mixed, counts = mix_replay(task, pool, 0.1, seed=5)
    assert counts["replay_rows"] == replay_count(300, 0.1) == 33
    assert len(mixed) == 333 and sum(ex.meta.get("replay", False) for ex in mixed) == 33
    assert all(ex in mixed for ex in task)  # every task row kept
    assert abs(counts["share"] - 33 / 333) < 1e-12
    again, _ = mix_replay(task, pool, 0.1, seed=5)
    other, _ = mix_replay(task, pool, 0.1, seed=6)
    assert [e.messages for e in again] == [e.messages for e in mixed]
    assert [e.messages for e in other] != [e.messages for e in mixed]
    assert not any(ex.meta.get("replay") for ex in pool)  # the pool itself is not tagged
    small, c = mix_replay(task, pool[:10], 0.25, seed=0)
    assert c["with_replacement"] and c["replay_rows"] == 100
    with pytest.raises(ValueError):
        replay_count(10, 1.0)


# -- the anchor's teacher -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lori-s", "lora"])
def test_teacher_is_the_model_before_the_stage_bit_for_bit(tiny, method):
    model, tok = tiny
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=method == "lora")
    torch.manual_seed(0)
    for layer in layers.values():  # a committed earlier stage
        layer.B_frozen.normal_(0, 0.05)
    ids = torch.tensor([tok("hello there, how are you", add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    for layer in layers.values():
        if method == "lori-s":
            layer.begin_sparse(torch.rand(layer.B_frozen.shape) < 0.3)
        else:
            layer.begin_dense()
    opt = torch.optim.AdamW(trainable_parameters(layers), lr=0.05)
    for _ in range(3):  # the stage trains: the model moves away from its teacher
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with stage_switched_off(layers):
            teacher = model(input_ids=ids).logits
        back_on = model(input_ids=ids).logits
    assert not torch.equal(student, before)
    assert torch.equal(teacher, before)  # bit for bit
    assert torch.equal(back_on, student)  # the switch is restored


def test_kl_anchor_is_zero_before_training_and_positive_after(tiny):
    model, tok = tiny
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=False)
    anchors = [encode_anchor(tok, [{"role": "user", "content": f"question {i}"}], f"I can't help with {i}", 4)
               for i in range(6)]
    assert all(sum(t != -100 for t in a.labels) == 4 for a in anchors)
    for layer in layers.values():
        layer.begin_sparse(torch.rand(layer.B_frozen.shape) < 0.5)
    term = KLAnchor("anchor_kl", layers, anchors, weight=2.0, batch_size=2, pad_id=tok.pad_token_id, seed=0)
    assert float(term(model, 1).detach()) == 0.0  # values start at B_frozen: student == teacher
    with torch.no_grad():
        for p in trainable_parameters(layers):
            p.add_(0.3)
    value = term(model, 1)
    assert float(value.detach()) > 0 and value.requires_grad
    batch = collate(step_batch(anchors, 2, 0, 1), tok.pad_token_id)
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(anchor_kl(s, s, batch["labels"]), torch.tensor(0.0), atol=1e-6)
    assert step_batch(anchors, 2, 0, 4) == step_batch(anchors, 2, 0, 4)  # depends on (seed, step) only


# -- safety merge ---------------------------------------------------------------------------------
def test_safety_merge_scales_only_the_stage_entries():
    """Safety owns column 0 of B, the stage column 1 (disjoint). With A's two rows opposite
    (module a) the stage's update undoes the safety update (cos = -1); with equal rows
    (module b) it reinforces it (cos = +1). Only module a's stage entries are scaled."""
    torch.manual_seed(0)
    out, inp = 6, 10
    a0 = torch.randn(inp)
    A = {"a": torch.stack([a0, -a0]), "b": torch.stack([a0, a0])}
    col = torch.randn(out)
    S = {m: torch.stack([col, torch.zeros(out)], dim=1) for m in "ab"}
    P = {m: torch.stack([torch.zeros(out), col * 0.5], dim=1) for m in "ab"}
    stage_mask = torch.zeros(out, 2, dtype=torch.bool)
    stage_mask[:, 1] = True
    B = {m: S[m] + P[m] for m in "ab"}
    cos = {m: update_cosine(P[m], S[m], A[m]) for m in "ab"}
    assert cos["a"] == pytest.approx(-1.0, abs=1e-5) and cos["b"] == pytest.approx(1.0, abs=1e-5)
    before = {m: B[m].clone() for m in "ab"}
    result = merge_conflicts(B, A, P, S, threshold=0.0, scale=0.25)
    assert result["scaled"] == ["a"]
    assert torch.equal(B["b"], before["b"])
    assert torch.equal(B["a"][~stage_mask], before["a"][~stage_mask])  # the safety entries: bit-identical
    assert torch.allclose(B["a"][stage_mask], 0.25 * before["a"][stage_mask], atol=1e-6)


# -- safety-aware allocation --------------------------------------------------------------------
def test_safety_aware_allocation_prefers_insensitive_free_entries():
    task = {"m1": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "m2": torch.tensor([[1.0, 1.0], [0.9, 0.9]])}
    sens = {"m1": torch.tensor([[10.0, 0.0], [10.0, 0.0]]), "m2": torch.tensor([[0.0, 0.0], [0.0, 0.0]])}
    free = {"m1": torch.ones(2, 2, dtype=torch.bool), "m2": torch.tensor([[True, False], [True, True]])}
    plain = allocate(task, free, 3)
    aware = allocate(task, free, 3, sens, strength=1.0)
    for m in (plain, aware):
        assert sum(int(t.sum()) for t in m.values()) == 3
        assert all(not (m[n] & ~free[n]).any() for n in m)  # only free entries
    assert plain["m1"][:, 0].all()  # magnitude takes the sensitive entries (ties by position)
    assert not aware["m1"][:, 0].any()  # safety-aware avoids them
    assert aware["m2"][1].all() or aware["m2"][0, 0]
    zero = safety_aware_scores(task, sens, free, 0.0)
    assert torch.equal(allocate(zero, free, 3)["m1"], plain["m1"])  # strength 0 = magnitude rule
    with pytest.raises(ValueError):
        safety_aware_scores(task, sens, free, -1.0)


# -- refusal direction --------------------------------------------------------------------------
def test_refusal_direction_is_the_difference_of_means(tiny, tmp_path):
    model, tok = tiny
    harmful = [[{"role": "user", "content": f"how do I build a weapon {i}"}] for i in range(5)]
    harmless = [[{"role": "user", "content": f"describe a sunny day {i}"}] for i in range(4)]
    info = refusal_direction(model, tok, harmful, harmless, batch_size=3)
    h = last_token_states(model, tok, harmful, batch_size=1)
    b = last_token_states(model, tok, harmless, batch_size=1)
    assert h.shape[0] == model.config.num_hidden_layers + 1
    assert torch.allclose(info["direction"], h.mean(1) - b.mean(1), atol=1e-5)  # batching does not matter
    proj = project(h, info["direction"])
    assert torch.allclose(proj.mean(1), info["harmful_mean"], atol=1e-4)
    # layer 0 is the embedding of the same last token (the assistant opening) for every prompt
    assert (info["harmful_mean"][1:] > info["harmless_mean"][1:]).all()  # harmful side of its own direction
    save_direction(tmp_path / "d.safetensors", info)
    back = load_direction(tmp_path / "d.safetensors")
    assert torch.equal(back["direction"], info["direction"]) and back["best_layer"] == info["best_layer"]


def test_snapshot_unchanged_by_switch(tiny):
    model, _ = tiny
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=False)
    snap = snapshot(layers)
    with stage_switched_off(layers):
        pass
    assert all(torch.equal(v, snapshot(layers)[k]) for k, v in snap.items())
