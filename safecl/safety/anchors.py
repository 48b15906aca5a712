"""Safety anchors: loss terms that hold a task stage's model to the model before the stage on
anchor prompts. Handed to the training loop as callables ``term(model, step) -> loss``.

Teacher. The model before the stage is the same model with the stage's trainable part switched
off (:func:`safecl.adapters.stage_switched_off`): B_eff = B_frozen, and for lora A = A at the
stage start. It is exact (bit for bit the model before the stage) and costs one extra forward
pass without gradient; nothing is stored.

Anchor set. Prompts with a response: either the teacher's own greedy answer (generated once at
the stage start; for a refusal anchor no safety training rows are needed), or a replay row's
gold response (replay distillation). Only the first ``tokens`` response positions carry the
loss: refusals are decided in the first tokens (the token-wise constrained objective of arXiv
2406.05946 weights exactly these).

KL anchor, per optimizer step, over a seeded batch of anchors and their response positions P::

    L_kl = w * mean_{(i, t) in P} KL( p_teacher(. | x_i, y_i,<t) || p_model(. | x_i, y_i,<t) )

Direction anchor, with r_l the unit refusal direction at layer l (safecl.safety.direction) and
h_l(x) the last prompt token's hidden state::

    L_dir = w * mean_i ( (h_l^model(x_i) - h_l^teacher(x_i)) . r_l )^2 / sigma_l^2

sigma_l = (harmful_mean - harmless_mean) projection gap at the safety stage, so L_dir = 1 means
the anchors moved by one full harmful-harmless gap along the direction.

Cost per step: one forward + backward of the model on ``batch_size`` anchors (prompt + tokens),
plus one forward for the teacher. Both are recorded per step in the stage's metrics.
Batches depend only on (seed, step), so a resumed stage sees the same anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecl.adapters import stage_switched_off
from safecl.data.formatting import IGNORE, Encoded, collate, render
from safecl.safety.direction import unit


def encode_anchor(tokenizer, prompt: list[dict], response: str, tokens: int, max_len: int = 512) -> Encoded | None:
    """Prompt (chat template, assistant opening) + the first ``tokens`` tokens of ``response``;
    labels only on those response tokens. None when the response is empty."""
    p_ids = tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:tokens]
    if not r_ids:
        return None
    p_ids = p_ids[-(max_len - len(r_ids)):] if len(p_ids) + len(r_ids) > max_len else p_ids
    return Encoded(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids)


def prompt_part(anchor: Encoded) -> Encoded:
    """The anchor cut to its prompt (the tokens before the first labelled one), no labels."""
    n = next((i for i, t in enumerate(anchor.labels) if t != IGNORE), len(anchor.labels))
    return Encoded(anchor.input_ids[:n], [IGNORE] * n)


def step_batch(items: list, batch_size: int, seed: int, step: int) -> list:
    """The anchors of optimizer step ``step`` (1-based): consecutive slices of a seeded
    permutation, a fresh one every pass. Depends only on (seed, step)."""
    per_pass = max(1, len(items) // batch_size)
    epoch, slot = divmod(step - 1, per_pass)
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(len(items), generator=gen).tolist()
    return [items[i] for i in order[slot * batch_size:(slot + 1) * batch_size]]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def anchor_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled positions of KL(teacher || student) (logits: B x T x V; labels: B x T,
    position t's label is predicted by logits at t - 1)."""
    sel = labels[:, 1:] != IGNORE
    t = F.log_softmax(teacher_logits[:, :-1][sel].float(), dim=-1)
    s = F.log_softmax(student_logits[:, :-1][sel].float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


class KLAnchor:
    """``term(model, step)``: weighted KL of the model to its teacher on a batch of anchors."""

    def __init__(self, name: str, layers: dict, anchors: list[Encoded], weight: float, batch_size: int,
                 pad_id: int, seed: int):
        if not anchors:
            raise ValueError(f"{name}: no anchors to hold the model to")
        self.name, self.layers, self.anchors = name, layers, anchors
        self.weight, self.batch_size, self.pad_id, self.seed = weight, batch_size, pad_id, seed

    def teacher_logits(self, model, batch: dict) -> torch.Tensor:
        with torch.no_grad(), stage_switched_off(self.layers):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def __call__(self, model, step: int) -> torch.Tensor:
        dev = _device(model)
        batch = {k: v.to(dev) for k, v in collate(step_batch(self.anchors, self.batch_size, self.seed, step),
                                                  self.pad_id).items()}
        teacher = self.teacher_logits(model, batch)
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.weight * anchor_kl(student, teacher, batch["labels"])


class DirectionAnchor:
    """``term(model, step)``: weighted squared change of the anchors' projection onto the
    refusal direction at ``layer`` (see module doc)."""

    name = "anchor_direction"

    def __init__(self, layers: dict, prompts: list[Encoded], direction: dict, weight: float, batch_size: int,
                 pad_id: int, seed: int, layer: int | None = None):
        if not prompts:
            raise ValueError("anchor_direction: no anchor prompts")
        self.layers, self.prompts, self.weight = layers, prompts, weight
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.layer = int(direction["best_layer"]) if layer is None else layer
        self.r = unit(direction["direction"][self.layer].float())
        gap = float(direction["harmful_mean"][self.layer] - direction["harmless_mean"][self.layer])
        self.sigma = max(abs(gap), 1e-6)

    def _projection(self, model, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[self.layer]
        last = batch["attention_mask"].sum(1) - 1
        return h[torch.arange(h.size(0), device=h.device), last].float() @ self.r.to(h.device)

    def __call__(self, model, step: int) -> torch.Tensor:
        dev = _device(model)
        batch = {k: v.to(dev) for k, v in collate(step_batch(self.prompts, self.batch_size, self.seed, step),
                                                  self.pad_id).items()}
        with torch.no_grad(), stage_switched_off(self.layers):
            teacher = self._projection(model, batch)
        student = self._projection(model, batch)
        return self.weight * ((student - teacher) / self.sigma).pow(2).mean()
