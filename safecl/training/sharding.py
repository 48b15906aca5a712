"""Sharding the frozen base model with FSDP2 (``fully_shard``), on GPUs or on CPU (gloo).

When: a run launched with an accelerate config of ``distributed_type: FSDP`` (accelerate's
launcher exports ``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION``) and more than one process.
accelerate applies FSDP only on accelerators (on CPU it silently falls back to plain data
parallel), and its ``prepare`` wraps a model once, while safecl adds a new trainable part at
every stage. So safecl makes the calls accelerate would make itself, the same on GPU and CPU:
``fully_shard`` on every transformer block (the model's ``_no_split_modules``, as accelerate's
``TRANSFORMER_BASED_WRAP``), then on the root, over a 1-D device mesh of all processes, with
``reshard_after_forward`` from ``FSDP_RESHARD_AFTER_FORWARD`` and bf16 compute when the config
asks for ``mixed_precision: bf16``.

What is sharded and what is not:

- sharded: the frozen base weights, i.e. what is large (16 GB at 8B). Each rank holds 1/N of them and
  all-gathers one block at a time in forward and backward;
- replicated: the adapter's tensors (A, B_frozen, the stage's trainable part; LoRA's trainable A is
  passed as ``ignored_params``). They are small (LoRI-S at 8B: 4.4M trainable entries) and every rank
  holds them whole, so the adapter written by rank 0 is the full PEFT adapter, written once.

Invariant: the gradients of the trainable part are averaged over ranks by one all-reduce per
optimizer step (``average_gradients``), the same average DDP takes, so with the loss scaled to
``sum / global tokens`` the update equals a 1-process run's up to float summation order.
Generation under sharding runs every forward on every rank in lockstep (``synced_gpus``), since
each forward all-gathers weights.

A rank that dies or hangs: every collective waits at most ``SAFECL_COLLECTIVE_TIMEOUT`` seconds
(default 1800, torch's own), then raises in the ranks still alive, which exit; the launcher
ends the rest. A rank killed outright closes its sockets, so gloo fails the survivors' next
collective at once. ``--resume`` then continues from the last checkpoint, as after any crash.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from safecl.errors import RecipeError as ConfigError
from safecl.errors import TrainingError
from safecl.evaluation.generation import fsdp_sharded as is_sharded  # noqa: F401 - one definition, re-exported

NO_DEEPSPEED = ("safecl does not run under DeepSpeed (ZeRO) yet: its engine steps the optimizer inside every backward "
                "and wraps the model once, safecl adds a trainable part per stage. For a sharded base model use FSDP2 "
                "(accelerate_configs/fsdp.yaml)")
FSDP2_ONLY = "safecl shards with FSDP2: set `fsdp_config: {fsdp_version: 2}` (see accelerate_configs/fsdp.yaml)"


def collective_timeout():
    """accelerate's process-group settings with the bounded collective timeout (module doc)."""
    from accelerate.utils import InitProcessGroupKwargs

    raw = os.environ.get("SAFECL_COLLECTIVE_TIMEOUT", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"SAFECL_COLLECTIVE_TIMEOUT={raw!r}: expected seconds (a number)") from None
    if seconds <= 0:
        raise ConfigError(f"SAFECL_COLLECTIVE_TIMEOUT={raw!r}: expected a positive number of seconds")
    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))


def refuse_deepspeed() -> None:
    """A DeepSpeed launch is refused, naming what to use instead.

    accelerate's DeepSpeed engine takes an optimizer step inside every ``backward`` and wraps a
    model once, while a safecl stage backpropagates its loss terms separately and every stage
    adds a new trainable part; on CPU accelerate also drops the DeepSpeed config silently and
    runs plain data parallel. Rather than train something else than asked, the run stops.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise TrainingError(NO_DEEPSPEED)


def check_accelerate_config(path: str) -> None:
    """Before relaunching: refuse what the run would refuse anyway, naming the file and key."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the accelerate config: {exc}") from exc
    kind = str(cfg.get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        raise ConfigError(f"{path}: distributed_type DEEPSPEED: {NO_DEEPSPEED}")
    version = str((cfg.get("fsdp_config") or {}).get("fsdp_version", 1))
    if kind == "FSDP" and version != "2":
        raise ConfigError(f"{path}: fsdp_config.fsdp_version is {version}; {FSDP2_ONLY}")


def fsdp_requested() -> bool:
    """A distributed launcher (accelerate, torchrun) started this process with FSDP asked for."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "WORLD_SIZE" in os.environ


def shard_base(model, layers: dict, device: torch.device) -> int:
    """Apply FSDP2 to ``model`` in place (module doc); returns the number of blocks sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise TrainingError(f"the accelerate config asks for FSDP version {version}; {FSDP2_ONLY}")
    if not dist.is_initialized():
        raise TrainingError("FSDP needs a process group: launch with --num-processes N (or `accelerate launch`)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = {p for layer in layers.values() for p in layer.parameters(recurse=False)}
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "full_shard", "1")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed == "bf16" \
        else MixedPrecisionPolicy()
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise TrainingError(f"FSDP: the model {type(model).__name__} names no transformer block class "
                            "(_no_split_modules); it cannot be sharded per block")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp,
                    ignored_params=ignored & set(block.parameters()))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=ignored)
    return len(blocks)


def local_share(model) -> tuple[int, int]:
    """(base-weight entries this rank holds, entries in all): about 1/N of them when sharded."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            held, total = held + p.to_local().numel(), total + p.numel()
    return held, total


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the replicated trainable tensors' gradients to their mean over ranks (one call)."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # same layout on every rank
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
