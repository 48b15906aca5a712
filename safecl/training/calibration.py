"""Mask calibration for a lori-s stage (see safecl.adapters.masks for the selection rule).

1. Every adapted module gets a dense trainable ``delta`` (LoRI-D) and trains for
   ``calibration_steps`` on the stage's own data, at ``calibration_lr_scale`` x the stage's
   learning rate (LoRI trains dense LoRI-D at 1/10 of the sparse LoRI-S rate).
2. Scores = |delta|; the mask = global top-k over the free entries (``allocation:
   magnitude``), or top-k of the safety-aware score when a safety sensitivity per entry is
   given (:mod:`safecl.adapters.allocation`).
3. The deltas are discarded: the stage then trains from B_frozen (zero on free entries) on
   its mask only.
"""

from __future__ import annotations

import math

from safecl.adapters.layer import LoRILinear
from safecl.adapters.allocation import allocate
from safecl.adapters.masks import Masks
from safecl.recipe.schema import AdapterConfig, TrainSettings
from safecl.training.loop import LoopResult, run_loop


def calibration_length(adapter: AdapterConfig, stage_steps: int) -> int:
    if adapter.calibration_steps is not None:
        return adapter.calibration_steps
    return max(1, math.ceil(adapter.calibration_fraction * stage_steps))


def calibrate_mask(model, layers: dict[str, LoRILinear], free: Masks, k: int, data, settings: TrainSettings,
                   steps: int, accelerator, pad_id: int, seed: int, desc: str, sensitivity: dict | None = None,
                   strength: float = 0.0) -> tuple[Masks, LoopResult]:
    """Dense pass, then global top-k of |B| (or the safety-aware score) among ``free`` entries;
    leaves every layer frozen."""
    for layer in layers.values():
        layer.begin_dense()
    params = [layer.delta for layer in layers.values()]  # A stays fixed during calibration
    result = run_loop(model, params, data, settings, steps, accelerator, pad_id, seed, desc)
    scores = {name: layer.delta.detach().abs().cpu() for name, layer in layers.items()}
    for layer in layers.values():
        layer.discard_stage()
    return allocate(scores, free, k, sensitivity, strength), result

