"""Safety anchors: loss terms that hold a task stage's model to the model before the stage on
anchor prompts. Handed to the training loop as callables ``term(model, step) -> loss``.

Teacher. The model before the stage is the same model with the stage's trainable part switched
off (:func:`safecl.adapters.stage_switched_off`): B_eff = B_frozen, and for lora A = A at the
stage start. It is exact (bit for bit the model before the stage) and does not change during
the stage, so the KL anchor computes its distributions once (:class:`TeacherCache`): at the
first step it runs (also the first step after a resume), the teacher's log-probabilities at
every anchor's labelled positions, kept for the whole stage. Memory:
anchors x tokens x vocabulary x 4 bytes (at most 64 x 16 x 49,152 x 4 = 192 MiB for SmolLM2; 181-185 MiB
measured, as some answers end before 16 tokens). Above
``cache_mb`` the anchor says so in the log and recomputes the teacher on each step's batch
instead (one extra forward per step, today's cost).

Exactness. The teacher is always run on anchors right-padded to the anchor set's longest
length W, so an anchor's rows do not depend on which other anchors share its batch: the
cache and the per-step recomputation give the same log-probabilities bit for bit (tested on
the CPU; a kernel that reduces differently by batch size would break it, and the test says so).
Both read the output layer at the labelled positions only (:mod:`safecl.logits`), as does the
student.

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
the output layer at their labelled positions only; the teacher's forward once per stage (per
step above the cache budget). Recorded per step in the stage's metrics, the cache's build time
and size in the term's ``info``.
Batches depend only on (seed, step), so a resumed stage sees the same anchors.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from safecl.adapters import stage_switched_off
from safecl.data.formatting import IGNORE, Encoded, collate, render
from safecl.logits import labelled_logits
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
    return kl_rows(student_logits[:, :-1][sel], t)


def kl_rows(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student): N x V student logits, N x V teacher log-probs."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - s)).sum(-1).mean()


class TeacherCache:
    """The teacher's log-probabilities at every anchor's labelled positions, computed once.

    ``rows[i]``: n_i x V float32 log-probabilities of anchor i (n_i = its labelled tokens), from
    the model with the stage's part switched off, on anchors padded to the set's width W in
    chunks of ``chunk`` (any chunk size gives the same rows: see the module doc).
    ``nbytes(anchors, vocab)`` = sum_i n_i x V x 4 is what it holds.
    """

    def __init__(self, model, layers: dict, anchors: list[Encoded], pad_id: int, chunk: int = 16):
        dev = _device(model)
        self.width = max(len(a.input_ids) for a in anchors)
        self.rows: list[torch.Tensor] = []
        with torch.no_grad(), stage_switched_off(layers):
            for i in range(0, len(anchors), chunk):
                part = anchors[i:i + chunk]
                batch = {k: v.to(dev) for k, v in collate(part, pad_id, self.width).items()}
                logp = F.log_softmax(labelled_logits(model, batch).float(), dim=-1)
                self.rows += list(logp.split([labelled(a) for a in part]))

    @staticmethod
    def nbytes(anchors: list[Encoded], vocab: int) -> int:
        return sum(labelled(a) for a in anchors) * vocab * 4

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.cat([self.rows[i] for i in indices])


def labelled(anchor: Encoded) -> int:
    """Labelled tokens of an anchor that a position predicts (the first token is never predicted)."""
    return sum(t != IGNORE for t in anchor.labels[1:])


class KLAnchor:
    """``term(model, step)``: weighted KL of the model to its teacher on a batch of anchors
    (every ``every``-th step, weighted ``every`` times; None on the others).

    ``cache_mb``: the teacher cache's budget (None: always cache; 0: never). ``info`` says
    what was done (``teacher``: ``cached`` or ``recomputed``, the cache's MB and build seconds)."""

    def __init__(self, name: str, layers: dict, anchors: list[Encoded], weight: float, batch_size: int,
                 pad_id: int, seed: int, cache_mb: float | None = None, echo=None, every: int = 1):
        if not anchors:
            raise ValueError(f"{name}: no anchors to hold the model to")
        self.name, self.layers, self.anchors = name, layers, anchors
        self.weight, self.batch_size, self.pad_id, self.seed = weight, batch_size, pad_id, seed
        self.every = every
        self.cache_mb, self.echo = cache_mb, echo
        self.width = max(len(a.input_ids) for a in anchors)
        self.cache: TeacherCache | None = None
        self.info: dict = {}

    def _decide(self, model) -> None:
        inner = getattr(model, "module", model)  # under DDP the model sits in .module
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        vocab = head.weight.size(0) if head is not None else inner.config.vocab_size
        need = TeacherCache.nbytes(self.anchors, vocab) / 2**20
        self.info = {"cache_mb_needed": round(need, 1), "cache_mb_budget": self.cache_mb}
        if self.cache_mb is not None and need > self.cache_mb:
            self.info["teacher"] = "recomputed"
            if self.echo is not None:
                self.echo(f"[safecl] {self.name}: the teacher cache would take {need:.0f} MB > budget "
                          f"{self.cache_mb:g} MB (anchor.cache_mb); the teacher is recomputed every step instead")
            return
        start = time.perf_counter()
        self.cache = TeacherCache(model, self.layers, self.anchors, self.pad_id)
        self.info.update(teacher="cached", cache_seconds=round(time.perf_counter() - start, 3))

    def teacher_logprobs(self, model, picks: list[int]) -> torch.Tensor:
        """The teacher's log-probabilities at the labelled positions of anchors ``picks``."""
        if self.cache is not None:
            return self.cache[picks]
        batch = {k: v.to(_device(model))
                 for k, v in collate([self.anchors[i] for i in picks], self.pad_id, self.width).items()}
        with torch.no_grad(), stage_switched_off(self.layers):
            return F.log_softmax(labelled_logits(model, batch).float(), dim=-1)

    def __call__(self, model, step: int) -> torch.Tensor | None:
        """The weighted KL at ``step``; None on the steps ``every`` skips (the j-th taken step,
        j = step / every, uses the anchors step_batch gives for j, weighted ``every`` times)."""
        if step % self.every:
            return None
        if not self.info:
            self._decide(model)
        dev = _device(model)
        picks = step_batch(list(range(len(self.anchors))), self.batch_size, self.seed, step // self.every)
        batch = {k: v.to(dev) for k, v in collate([self.anchors[i] for i in picks], self.pad_id).items()}
        teacher = self.teacher_logprobs(model, picks).to(dev)
        return self.weight * self.every * kl_rows(labelled_logits(model, batch), teacher)


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
