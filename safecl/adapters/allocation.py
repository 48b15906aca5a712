"""Mask allocation: which free B entries a stage gets, from a score per entry.

``magnitude`` (LoRI): score = |B_calibration|; the mask = global top-k of the free entries
(:func:`safecl.adapters.masks.global_topk`).

``safety-aware``: with the task score T (|B_calibration|) and a safety sensitivity S >= 0 per
entry (where it comes from is not this module's business; safecl uses the Fisher of the
anchors' refusal log-likelihood, safecl.safety.sensitivity), both normalised by their mean
over the free entries::

    score = (T / mean_free T) / (1 + lambda * S / mean_free S)

lambda = 0 is the magnitude rule; the larger lambda, the more an entry's effect on safety
demotes it. The mask is the global top-k of this score over the free entries, so the
invariants of global_topk hold: exactly k entries, all free (hence disjoint from every
earlier stage's).
"""

from __future__ import annotations

import torch

from safecl.adapters.masks import Masks, global_topk


def safety_aware_scores(task: dict[str, torch.Tensor], sensitivity: dict[str, torch.Tensor], free: Masks,
                        strength: float) -> dict[str, torch.Tensor]:
    """Combined scores (see module doc); entries that are not free keep any value (never chosen)."""
    if strength < 0:
        raise ValueError(f"allocation strength must be >= 0, got {strength}")
    names = sorted(task)
    free_flat = torch.cat([free[n].flatten() for n in names])
    t_flat = torch.cat([task[n].detach().float().abs().cpu().flatten() for n in names])
    s_flat = torch.cat([sensitivity[n].detach().float().clamp_min(0).cpu().flatten() for n in names])
    t_mean = t_flat[free_flat].mean().clamp_min(1e-30)
    s_mean = s_flat[free_flat].mean().clamp_min(1e-30)
    return {n: (task[n].detach().float().abs().cpu() / t_mean)
            / (1 + strength * sensitivity[n].detach().float().clamp_min(0).cpu() / s_mean) for n in names}


def allocate(task: dict[str, torch.Tensor], free: Masks, k: int, sensitivity: dict[str, torch.Tensor] | None = None,
             strength: float = 0.0) -> Masks:
    """k free entries: magnitude top-k, or safety-aware when ``sensitivity`` is given."""
    scores = task if sensitivity is None else safety_aware_scores(task, sensitivity, free, strength)
    return global_topk(scores, free, k)
