"""One stage: (calibrate a mask) -> train this stage's part of the adapter -> commit.

lori-s: the mask is found by :func:`~safecl.training.calibration.calibrate_mask` among the
entries no earlier stage owns (all entries when ``adapter.disjoint`` is false), then only
its entries train. lori-d / lora: a dense ``delta`` on top of B_frozen trains (and A too for
lora). A resumed stage takes its mask and trainable tensors from the checkpoint instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from safecl.adapters import trainable_parameters
from safecl.adapters.layer import LoRILinear
from safecl.adapters.masks import mask_size, mask_stats, union
from safecl.recipe.schema import Recipe
from safecl.training.calibration import calibrate_mask
from safecl.training.checkpoint import apply_trainable, save_checkpoint
from safecl.training.loop import run_loop


@dataclass
class StagePlan:
    index: int
    name: str
    kind: str
    examples: int
    steps: int
    lr: float
    batch_size: int
    grad_accum: int
    max_seq_len: int
    density: float | None = None
    calibration_steps: int | None = None

    def row(self) -> str:
        extra = ""
        if self.density is not None:
            extra = f"  density={self.density:g} calibration={self.calibration_steps} steps"
        return (f"  {self.index:02d} {self.name:<14} {self.kind:<7} examples={self.examples:<6} steps={self.steps:<5} "
                f"lr={self.lr:g} batch={self.batch_size}x{self.grad_accum} max_len={self.max_seq_len}{extra}")


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    accelerator: object
    model: object
    tokenizer: object
    layers: dict[str, LoRILinear]
    shapes: dict[str, tuple[int, int]]
    capacity: int
    main: bool
    probe_carry: tuple | None = None  # (adapter fingerprint, probe retention) of the last probe reading


def train_stage(ctx: RunContext, plan, encoded, owned: list[dict], metrics: dict, sdir: Path,
                resume: dict | None, terms: list | None = None, sensitivity: dict | None = None,
                settings=None, seed: int | None = None, monitors: list | None = None) -> dict | None:
    """Train stage ``plan.index`` in place (layers end committed); fills ``metrics``; returns its mask.

    ``terms``: extra loss terms for the loop (safety anchors, replay distillation);
    ``sensitivity``: per-entry safety sensitivity for safety-aware allocation (lori-s);
    ``settings`` / ``seed``: a stage the runner schedules itself (a repair pass) brings its own;
    ``monitors``: watchers called by the loop (the refusal probe), which may end the stage early.
    """
    a = ctx.recipe.adapter
    settings = settings if settings is not None else ctx.recipe.stage_settings(plan.index)
    seed = seed if seed is not None else ctx.recipe.seed * 1000 + plan.index * 10
    torch.manual_seed(seed)
    pad = ctx.tokenizer.pad_token_id
    mask = None
    if a.method == "lori-s":
        taken = union(owned, ctx.shapes)  # entries earlier stages own
        if resume is not None:
            mask, metrics["calibration"] = resume["mask"], resume["calibration"]
        else:
            free = {n: ~m for n, m in taken.items()} if a.disjoint else {
                n: torch.ones(s, dtype=torch.bool) for n, s in ctx.shapes.items()}
            calib_settings = settings.model_copy(update={"lr": settings.lr * a.calibration_lr_scale})
            mask, calib = calibrate_mask(ctx.model, ctx.layers, free, mask_size(plan.density, ctx.capacity), encoded,
                                         calib_settings, plan.calibration_steps, ctx.accelerator, pad, seed + 1,
                                         desc=f"{plan.index:02d} {plan.name} calibrate", sensitivity=sensitivity,
                                         strength=a.allocation_strength)
            metrics["calibration"] = {"steps": calib.steps, "seconds": round(calib.seconds, 3),
                                      "allocation": "safety-aware" if sensitivity is not None else "magnitude",
                                      "last_loss": calib.losses[-1] if calib.losses else None, "losses": calib.losses}
        for name, layer in ctx.layers.items():
            layer.begin_sparse(mask[name])
        metrics["mask"] = mask_stats(mask, ctx.capacity, sum(int(m.sum()) for m in taken.values()))
    else:
        for layer in ctx.layers.values():
            layer.begin_dense()
    if resume is not None:
        apply_trainable(ctx.layers, resume["trainable"])
    params = trainable_parameters(ctx.layers)
    metrics["trainable_params"] = sum(p.numel() for p in params)

    def checkpoint(step, optimizer, scheduler, loop_state):
        if ctx.main:
            save_checkpoint(sdir / "checkpoint", step, ctx.layers, optimizer, scheduler, loop_state, mask,
                            {"calibration": metrics.get("calibration")})

    result = run_loop(ctx.model, params, encoded, settings, plan.steps, ctx.accelerator, pad, seed,
                      desc=f"{plan.index:02d} {plan.name}", resume=resume, checkpoint=checkpoint, terms=terms,
                      monitors=monitors)
    for layer in ctx.layers.values():
        layer.commit_stage()
    metrics["train"] = result.summary()
    return mask
