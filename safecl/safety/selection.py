"""Which anchor prompts a task stage holds: a seeded random draw, or the prompts nearest the task.

Why nearest: a task stage erodes refusal most where its own instructions look like harmful
requests. Measured on the three-task sequence (docs/results/saferpaca-gsm8k.md): over the
CodeAlpaca stage, AdvBench prompts that ask for a script, program or tool lost 0.23 / 0.10 of
refusal (seeds 0 / 1) while the others moved by 0.02 at most, and the random anchors held their own
prompts throughout (KL <= 0.09) because almost none of them (13 of Saferpaca's 2,483 safety
rows) ask for code. A share of the anchors drawn where the task pushes guards that region.

The similarity, computed once at the stage start with the model before the stage (the
teacher): each prompt's user text (no chat template, whose fixed system turn would dominate)
is embedded as the mean over its tokens of the hidden state after block ``layer`` (default
the middle one), h(p) in R^d. With mu the mean embedding of the candidate pool, u(p) =
(h(p) - mu) / ||h(p) - mu|| (centred: raw LM states share one large common direction) and the
task centroid c = mean over the stage's training prompts t of u(t), a candidate's score is
<u(p), c>. The ``round(share * limit)`` highest-scoring candidates are taken, the rest of the
``limit`` drawn at random from the others (seeded). Invariant: share 0 gives exactly the
random draw (same prompts, same order) that an anchor without selection gives.

Nothing here reads the retention check's prompts: the pool is the anchor's own ``prompts``
source and the target is the stage's own training data.
"""

from __future__ import annotations

import random

import torch

from safecl.data.formatting import pad_right, user_text


@torch.no_grad()
def mean_states(model, tokenizer, texts: list[str], layer: int | None = None, batch_size: int = 32,
                max_tokens: int = 128) -> torch.Tensor:
    """(N, hidden) float32: each text's hidden state after block ``layer`` (None: the middle
    block), averaged over its (at most ``max_tokens``) tokens. Right padding, masked mean, so a
    text's row does not depend on its batch beyond float rounding."""
    n_layers = model.config.num_hidden_layers
    layer = n_layers // 2 if layer is None else layer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            input_ids, attn = pad_right([tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [pad]
                                         for t in texts[start:start + batch_size]], pad)
            hs = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                       output_hidden_states=True).hidden_states[layer].float()
            m = attn.to(dev).unsqueeze(-1).float()
            out.append(((hs * m).sum(1) / m.sum(1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def task_scores(pool: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """<u(p), c> for every pool row (see the module docstring): pool (N, d), task (M, d)."""
    mu = pool.mean(0, keepdim=True)
    u = torch.nn.functional.normalize(pool - mu, dim=1)
    c = torch.nn.functional.normalize(task - mu, dim=1).mean(0)
    return u @ c


def top(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` best-scoring rows, best first (ties: the lower index)."""
    return torch.argsort(scores, descending=True, stable=True)[:n].tolist()


def nearest_count(n_pool: int, limit: int, share: float) -> int:
    """How many of the ``min(limit, n_pool)`` anchors are chosen as the nearest."""
    return round(share * min(limit, n_pool))


def pick_anchors(n_pool: int, limit: int, seed: int, scores: torch.Tensor | None = None,
                 share: float = 0.0) -> list[int]:
    """Indices into the pool, sorted: the ``round(share * limit)`` best-scoring, then the rest at
    random. With share 0 (or no scores) exactly ``sorted(Random(seed).sample(range(n_pool), k))``."""
    k = min(limit, n_pool)
    n_near = nearest_count(n_pool, limit, share) if scores is not None else 0
    rng = random.Random(seed)
    if n_near == 0:
        return sorted(rng.sample(range(n_pool), k))
    near = top(scores, n_near)
    rest = sorted(set(range(n_pool)) - set(near))
    return sorted(near + rng.sample(rest, k - n_near))


def nearest_scores(model, tokenizer, pool_prompts: list[list[dict]], task_prompts: list[list[dict]],
                   layer: int | None = None) -> torch.Tensor:
    """Scores of the pool prompts against the task prompts (model = the teacher)."""
    texts = [user_text(p) for p in pool_prompts] + [user_text(p) for p in task_prompts]
    states = mean_states(model, tokenizer, texts, layer)
    return task_scores(states[:len(pool_prompts)], states[len(pool_prompts):])
