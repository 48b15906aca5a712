"""The KL anchor's exact teacher cache and the output layer at labelled positions only.

- The cached teacher gives the same anchor loss, bit for bit, as the teacher recomputed on
  every step's batch (lori-s and lora, over several steps of a stage that moves the model).
- A resumed stage (a fresh model given the checkpoint's trainable state) rebuilds the same
  cache, bit for bit.
- Logits at labelled positions equal the full forward's logits at those positions (1e-6),
  for the task loss and the anchor; the task loss is the full-logit loss.
- Over the budget the teacher is recomputed, and the log says so.
"""

import pytest
import torch
import torch.nn.functional as F

from safecl.adapters import inject_adapters, stage_switched_off, trainable_parameters
from safecl.data.formatting import IGNORE, collate
from safecl.logits import labelled_logits, labelled_targets
from safecl.safety.anchors import KLAnchor, TeacherCache, anchor_kl, encode_anchor, step_batch
from safecl.training.checkpoint import apply_trainable
from safecl.training.loop import response_loss

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _anchors(tok, n=10, tokens=6):
    # prompts of different lengths, so batches are padded differently from step to step
    return [encode_anchor(tok, [{"role": "user", "content": "please " * (i % 4) + f"question {i}"}],
                          f"I cannot help with request number {i}.", tokens) for i in range(n)]


def _begin(layers, method, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        if method == "lori-s":
            layer.begin_sparse(torch.rand(layer.B_frozen.shape, generator=gen) < 0.4)
        else:
            layer.begin_dense()


def _move(layers, amount=0.2):
    with torch.no_grad():
        for p in trainable_parameters(layers):
            p.add_(amount * torch.randn_like(p))


@pytest.mark.parametrize("method", ["lori-s", "lora"])
def test_cached_teacher_loss_equals_recomputed_bit_for_bit(tiny, method):
    model, tok = tiny
    torch.manual_seed(0)
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=method == "lora")
    anchors = _anchors(tok)
    _begin(layers, method)
    cached = KLAnchor("anchor_kl", layers, anchors, 2.0, 3, tok.pad_token_id, seed=5)
    recomputed = KLAnchor("anchor_kl", layers, anchors, 2.0, 3, tok.pad_token_id, seed=5, cache_mb=0)
    for step in range(1, 8):  # more than one pass over the anchors: every composition differs
        _move(layers)
        a, b = cached(model, step), recomputed(model, step)
        assert torch.equal(a, b), (step, float(a), float(b))
        assert float(a.detach()) > 0
    assert cached.info["teacher"] == "cached" and recomputed.info["teacher"] == "recomputed"
    # and the cache holds the model before the stage, not the moved one
    picks = step_batch(list(range(len(anchors))), 3, 5, 1)
    batch = collate([anchors[i] for i in picks], tok.pad_token_id)
    with torch.no_grad(), stage_switched_off(layers):
        teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = 2.0 * anchor_kl(student, teacher, batch["labels"])  # the pre-cache loss: full logits, batch width
        assert float((cached(model, 1) - full).abs()) < 1e-6


def _moved_stage(tiny):
    """(model, tokenizer, layers, anchors): a lori-s stage begun and moved away from its teacher."""
    model, tok = tiny
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=False)
    _begin(layers, "lori-s")
    _move(layers)
    return model, tok, layers, _anchors(tok)


def test_resumed_stage_rebuilds_the_same_cache(tiny):
    model, tok, layers, anchors = _moved_stage(tiny)
    first = TeacherCache(model, layers, anchors, tok.pad_token_id, chunk=4)
    state = {f"{n}.values": layer.values.detach().clone() for n, layer in layers.items()}  # as a checkpoint holds it

    from safecl.models import load_model_and_tokenizer
    from safecl.recipe.schema import ModelConfig

    fresh, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), seed=0)
    fresh_layers = inject_adapters(fresh, TARGETS, 4, 8, seed=0, train_A=False)
    _begin(fresh_layers, "lori-s")
    apply_trainable(fresh_layers, state)
    again = TeacherCache(fresh, fresh_layers, anchors, tok.pad_token_id, chunk=3)  # other chunks, same rows
    assert len(first.rows) == len(again.rows) == len(anchors)
    assert all(torch.equal(x, y) for x, y in zip(first.rows, again.rows))
    assert all(r.shape == (sum(t != IGNORE for t in a.labels[1:]), len(tok)) for r, a in zip(first.rows, anchors))


def test_labelled_logits_equal_the_full_forward(tiny):
    model, tok = tiny
    anchors = _anchors(tok, n=5)
    batch = collate(anchors, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        part = labelled_logits(model, batch)
        sel = batch["labels"][:, 1:] != IGNORE
        assert part.shape == (int(sel.sum()), full.size(-1))
        assert torch.allclose(part, full[:, :-1][sel], atol=1e-6, rtol=0)
        targets = labelled_targets(batch["labels"])
        loss, n = response_loss(model, batch)
        reference = F.cross_entropy(full[:, :-1].reshape(-1, full.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                    ignore_index=IGNORE, reduction="sum")
        assert n == targets.numel() == int(sel.sum())
        assert abs(float(loss) - float(reference)) <= 1e-6 * max(1.0, abs(float(reference)))


def test_over_budget_the_teacher_is_recomputed_and_logged(tiny):
    model, tok = tiny
    layers = inject_adapters(model, TARGETS, 4, 8, seed=0, train_A=False)
    anchors = _anchors(tok)
    _begin(layers, "lori-s")
    need_mb = TeacherCache.nbytes(anchors, len(tok)) / 2**20
    said = []
    term = KLAnchor("anchor_kl", layers, anchors, 1.0, 4, tok.pad_token_id, seed=0, cache_mb=need_mb / 2,
                    echo=said.append)
    term(model, 1)
    assert term.cache is None and term.info["teacher"] == "recomputed"
    assert len(said) == 1 and "anchor.cache_mb" in said[0] and "recomputed every step" in said[0]
    roomy = KLAnchor("anchor_kl", layers, anchors, 1.0, 4, tok.pad_token_id, seed=0, cache_mb=need_mb * 2,
                     echo=said.append)
    roomy(model, 1)
    assert roomy.cache is not None and roomy.info["teacher"] == "cached" and len(said) == 1


def test_every_n_takes_the_term_on_every_nth_step_weighted_n_times(tiny):
    model, tok, layers, anchors = _moved_stage(tiny)
    each = KLAnchor("anchor_kl", layers, anchors, 1.5, 3, tok.pad_token_id, seed=2)
    third = KLAnchor("anchor_kl", layers, anchors, 1.5, 3, tok.pad_token_id, seed=2, every=3)
    assert third(model, 1) is None and third(model, 2) is None and third(model, 4) is None
    with torch.no_grad():
        # the j-th taken step (step 3j) draws the anchors of step j, weighted 3 times
        assert torch.allclose(third(model, 3), 3 * each(model, 1), rtol=1e-6, atol=0)
        assert torch.allclose(third(model, 6), 3 * each(model, 2), rtol=1e-6, atol=0)
        assert not torch.allclose(each(model, 1), each(model, 2), rtol=1e-3, atol=0)  # other anchors, other value
