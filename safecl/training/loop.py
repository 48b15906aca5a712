"""One stage's optimisation loop on accelerate.

Loss: token-level cross entropy over response tokens, summed over the micro-batches of one
optimizer step (on every process) and divided by their total number of response tokens, so
gradient accumulation and data parallelism give the same gradient as one big batch. AdamW, a warmup + linear/cosine/constant schedule and
global-norm clipping over all trainable tensors. The data order is a seeded permutation per
epoch; each process takes every ``num_processes``-th example of a micro-batch.

Extra loss terms (safety anchors, replay distillation) are handed in as callables
``term(model, step) -> scalar tensor or None`` (already weighted; None: the term skips this
step); each is evaluated once per optimizer step and its gradient is added to the task gradient:
``loss_step = CE_response / n_tokens + sum_k term_k``. The loop knows nothing of what a term
means; it records each term's values and its seconds (the term's cost per step).

Monitors (the refusal probe) are callables ``monitor(model, step, last) -> stop`` called before
the first step (step 0) and after every optimizer step (and its checkpoint); one that returns
True ends the stage at that step (``stopped_at``). Their ``state()`` goes into checkpoints.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler

from safecl.data.formatting import IGNORE, Encoded, collate
from safecl.errors import TrainingError
from safecl.faults import fault_point
from safecl.logits import labelled_logits, labelled_targets
from safecl.recipe.schema import TrainSettings
from safecl.training.sharding import average_gradients, is_sharded


@dataclass
class LoopResult:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    term_values: dict[str, list[float]] = field(default_factory=dict)
    term_seconds: dict[str, float] = field(default_factory=dict)
    stopped_at: int | None = None

    def summary(self) -> dict:
        tail = self.losses[-10:]
        terms = {name: {"mean": sum(v) / len(v) if v else None, "last": v[-1] if v else None,
                        "seconds": round(self.term_seconds.get(name, 0.0), 3),
                        # per optimizer step of the stage (a term taken every N steps costs 1/N of a call)
                        "seconds_per_step": self.term_seconds.get(name, 0.0) / self.steps if self.steps else None,
                        "calls": len(v),
                        "share_of_stage_time": self.term_seconds.get(name, 0.0) / self.seconds if self.seconds else None,
                        "values": v}
                 for name, v in self.term_values.items()}
        return {"steps": self.steps, "response_tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None,
                "mean_loss_last10": sum(tail) / len(tail) if tail else None,
                "optimizer_state_bytes": self.optimizer_state_bytes,
                "losses": self.losses, "lrs": self.lrs, **({"terms": terms} if terms else {}),
                **({"stopped_at": self.stopped_at} if self.stopped_at is not None else {})}


def total_steps(n_examples: int, s: TrainSettings) -> int:
    """Optimizer steps of a stage: ``max_steps`` or ceil(epochs * batches / grad_accum)."""
    if s.max_steps is not None:
        return s.max_steps
    batches = math.ceil(n_examples / s.batch_size)
    return max(1, math.ceil(s.epochs * batches / s.grad_accum))


def micro_batches(data: list[Encoded], batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of micro-batches: a fresh seeded permutation every epoch."""
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(data), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size][rank::world]
            if chunk:
                yield [data[i] for i in chunk]
        epoch += 1


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over response tokens, number of those tokens). The output layer
    runs at the response positions only (safecl.logits)."""
    targets = labelled_targets(batch["labels"])
    loss = F.cross_entropy(labelled_logits(model, batch).float(), targets, reduction="sum")
    return loss, int(targets.numel())


def run_loop(model, params: list[torch.nn.Parameter], data: list[Encoded], settings: TrainSettings, steps: int,
             accelerator, pad_id: int, seed: int, desc: str, resume: dict | None = None,
             checkpoint=None, terms: list | None = None, monitors: list | None = None) -> LoopResult:
    """Train ``params`` of ``model`` for ``steps`` optimizer steps; returns losses and timings.

    ``resume``: a checkpoint state (step, optimizer, scheduler, loop, rng) to continue from;
    the data stream skips the micro-batches already consumed, so the run goes on exactly as
    if uninterrupted. ``checkpoint(step, optimizer, scheduler, loop_state)`` is called every
    ``settings.checkpoint_every`` steps (not after the last one). ``terms``: extra loss terms
    (objects with a ``name`` and ``__call__(model, step) -> scalar tensor``); ``monitors``: see
    the module doc.
    """
    terms = list(terms or [])
    monitors = list(monitors or [])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * steps)
    scheduler = get_scheduler(settings.scheduler if settings.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    sharded = is_sharded(model)  # FSDP2 by safecl (training/sharding.py): no DDP wrapper, gradients averaged below
    if sharded:
        wrapped = model
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    data_parallel = accelerator.num_processes > 1 and not sharded
    wrapped.train()
    stream = micro_batches(data, settings.batch_size, seed, accelerator.process_index, accelerator.num_processes)
    result = LoopResult()
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        loop = resume["loop"]
        result.losses, result.lrs, result.tokens = list(loop["losses"]), list(loop["lrs"]), loop["tokens"]
        result.term_values = {k: list(v) for k, v in loop.get("term_values", {}).items()}
        result.term_seconds = dict(loop.get("term_seconds", {}))
        first = resume["step"] + 1
        for _ in range(resume["step"] * settings.grad_accum):
            next(stream)
        for m in monitors:
            m.load_state(loop.get("monitors", {}).get(m.name, {"points": [], "seconds": 0.0}))
    else:
        for m in monitors:
            m(wrapped, 0, False)
    bar = tqdm(total=steps, initial=first - 1, desc=desc, disable=not accelerator.is_main_process,
               dynamic_ncols=True, leave=True)
    start = time.perf_counter() - (resume["loop"]["seconds"] if resume is not None else 0.0)
    for step in range(first, steps + 1):
        group = [collate(next(stream), pad_id) for _ in range(settings.grad_accum)]
        group = [{k: v.to(accelerator.device) for k, v in b.items()} for b in group]
        n_local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
        n_tokens = max(1, _global_count(n_local, accelerator))
        step_loss = 0.0
        for term in terms:  # before the task micro-batches: their last backward syncs DDP gradients
            t0 = time.perf_counter()
            with accelerator.no_sync(wrapped) if data_parallel else nullcontext():
                value = term(wrapped, step)
                if value is not None:  # a term may skip a step (the same steps on every rank)
                    accelerator.backward(value)
            if value is not None:
                result.term_values.setdefault(term.name, []).append(_global_sum(float(value.detach()), accelerator)
                                                                    / accelerator.num_processes)
            result.term_seconds[term.name] = result.term_seconds.get(term.name, 0.0) + time.perf_counter() - t0
        for j, batch in enumerate(group):
            sync = j == len(group) - 1
            ctx = accelerator.no_sync(wrapped) if not sync and data_parallel else nullcontext()
            with ctx:
                loss_sum, _ = response_loss(wrapped, batch)
                # DDP averages gradients over ranks: scale so the result is sum / global tokens
                loss = loss_sum * accelerator.num_processes / n_tokens
                accelerator.backward(loss)
            step_loss += float(loss.detach()) / accelerator.num_processes
        step_loss = _global_sum(step_loss, accelerator)
        if not math.isfinite(step_loss):
            bar.close()
            raise TrainingError(f"{desc}: loss is {step_loss} at step {step}; stopping the stage "
                                "(lower the learning rate or check the data). Earlier stages' artifacts are intact.")
        if sharded:
            average_gradients(params)  # replicated adapter tensors: the mean DDP would take
        if settings.max_grad_norm is not None:
            clip = torch.nn.utils.clip_grad_norm_ if sharded else accelerator.clip_grad_norm_
            clip(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps = step
        result.tokens += n_tokens
        result.losses.append(step_loss)
        result.lrs.append(scheduler.get_last_lr()[0])
        bar.update(1)
        if step % settings.log_every == 0 or step == steps:
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{result.lrs[-1]:.2e}")
        every = settings.checkpoint_every
        if checkpoint is not None and every and step % every == 0 and step < steps:
            checkpoint(step, optimizer, scheduler, {"losses": result.losses, "lrs": result.lrs, "tokens": result.tokens,
                                                    "seconds": time.perf_counter() - start,
                                                    "term_values": result.term_values,
                                                    "term_seconds": result.term_seconds,
                                                    "monitors": {m.name: m.state() for m in monitors}})
        fault_point("step")
        if [m for m in monitors if m(wrapped, step, step == steps)]:
            result.stopped_at = step
            break
    bar.close()
    result.seconds = time.perf_counter() - start
    result.optimizer_state_bytes = sum(t.numel() * t.element_size() for st in optimizer.state.values()
                                       for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    wrapped.eval()
    accelerator.free_memory()
    return result


def _global_count(n: int, accelerator) -> int:
    if accelerator.num_processes == 1:
        return n
    return int(accelerator.reduce(torch.tensor([n], device=accelerator.device), reduction="sum").item())


def _global_sum(x: float, accelerator) -> float:
    if accelerator.num_processes == 1:
        return x
    return float(accelerator.reduce(torch.tensor([x], dtype=torch.float64, device=accelerator.device),
                                    reduction="sum").item())

