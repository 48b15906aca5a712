"""The refusal probe: how much of the safety stage's refusal a model still has, from one forward
pass over harmful prompts, no generation.

With r the unit refusal direction at layer l* (``best_layer`` of :mod:`safecl.safety.direction`)
and P the probe prompts (the first ``retention.probe.limit`` of ``refusal_direction.harmful``:
held-in, never the retention check's), h^M_l(p) the last prompt token's state of model M::

    s(M) = mean_{p in P} h^M_{l*}(p) . r                              (probe score)
    probe_retention(M) = (s(M) - s(base)) / (s(safety) - s(base))

s(base) is measured with every adapter off (the base model bit for bit), s(safety) right after
the safety stage, so probe retention is 0 for the base model and 1 for the post-safety model by
construction. Both are stored in ``<safety stage dir>/refusal_probe.json``.

During a task stage :class:`ProbeMonitor` measures probe retention before the first step, every
``every`` optimizer steps and at the stage end. With ``gate.watch: probe`` it acts when the value
falls below ``gate.min_probe_retention``: ``halt`` stops the stage at that step; ``rollback``
puts back the stage's trainable tensors of the last probed step at or above the threshold (the
stage start at worst) and ends the stage there. Cost per probe: one no-gradient forward pass over
``limit`` prompts; the monitor records its seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from safecl.adapters import adapters_off, trainable_parameters
from safecl.atomic import write_json
from safecl.safety.direction import last_token_states, unit

PROBE_FILE = "refusal_probe.json"


def probe_score(model, tokenizer, prompts: list[list[dict]], layer: int, direction: torch.Tensor,
                batch_size: int = 16) -> float:
    """s(M): the mean projection of the prompts' last-token states at ``layer`` onto the unit direction."""
    states = last_token_states(model, tokenizer, prompts, batch_size)[layer]
    return float((states @ unit(direction.float())).mean())


def probe_reference(model, tokenizer, layers: dict, prompts: list[list[dict]], direction: dict,
                    batch_size: int = 16) -> dict:
    """{layer, n, base, safety}: s(base) (adapters off) and s(model now, right after the safety stage)."""
    layer = int(direction["best_layer"])
    r = direction["direction"][layer]
    safety = probe_score(model, tokenizer, prompts, layer, r, batch_size)
    with adapters_off(layers):
        base = probe_score(model, tokenizer, prompts, layer, r, batch_size)
    return {"layer": layer, "n": len(prompts), "base": base, "safety": safety}


def save_reference(path: Path, ref: dict) -> None:
    write_json(path, ref)


def load_reference(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def probe_retention(score: float, ref: dict) -> float | None:
    """(s - s_base) / (s_safety - s_base); None when the safety stage did not move the score."""
    gap = ref["safety"] - ref["base"]
    return (score - ref["base"]) / gap if abs(gap) > 1e-12 else None


class ProbeMonitor:
    """``monitor(model, step, last) -> stop?``, called by the training loop (step 0 = before the
    first step); see the module doc. ``points``: [step, probe retention] in step order."""

    name = "probe"

    def __init__(self, tokenizer, layers: dict, prompts: list[list[dict]], ref: dict, direction: dict, every: int,
                 batch_size: int = 16, threshold: float | None = None, action: str = "halt"):
        self.tokenizer, self.layers, self.prompts, self.ref = tokenizer, layers, prompts, ref
        self.r = direction["direction"][ref["layer"]].float()
        self.every, self.batch_size, self.threshold, self.action = every, batch_size, threshold, action
        self.points: list[list[float]] = []
        self.seconds = 0.0
        self.fired: dict | None = None
        self._good: tuple[int, list[torch.Tensor]] | None = None

    def measure(self, model) -> float | None:
        start = time.perf_counter()
        value = probe_retention(probe_score(model, self.tokenizer, self.prompts, self.ref["layer"], self.r,
                                            self.batch_size), self.ref)
        self.seconds += time.perf_counter() - start
        return value

    def __call__(self, model, step: int, last: bool) -> bool:
        if step % self.every and not last:
            return False
        value = self.measure(model)
        self.points.append([step, value])
        if self.threshold is None or value is None:
            return False
        if step == 0 or value >= self.threshold:  # the stage start is always a place to roll back to
            self._good = (step, [p.detach().clone() for p in trainable_parameters(self.layers)])
            return False
        self.fired = {"step": step, "probe_retention": value, "threshold": self.threshold, "action": self.action}
        if self.action == "rollback" and self._good is not None:
            with torch.no_grad():
                for p, kept in zip(trainable_parameters(self.layers), self._good[1]):
                    p.copy_(kept)
            self.fired["restored_step"] = self._good[0]
        return True

    def state(self) -> dict:
        return {"points": self.points, "seconds": self.seconds}

    def load_state(self, state: dict) -> None:
        """Resume: the points so far; the rollback target becomes the resume point when the last
        probe was at or above the threshold (the tensors of earlier probed steps are not stored)."""
        self.points, self.seconds = [list(p) for p in state["points"]], state["seconds"]
        if self.points and self.threshold is not None and (self.points[-1][1] or 0) >= self.threshold:
            self._good = (int(self.points[-1][0]), [p.detach().clone() for p in trainable_parameters(self.layers)])

    def summary(self, train_seconds: float) -> dict:
        return {"every": self.every, "layer": self.ref["layer"], "prompts": len(self.prompts), "points": self.points,
                "probes": len(self.points), "seconds": round(self.seconds, 3),
                "share_of_stage_time": self.seconds / train_seconds if train_seconds else None,
                "threshold": self.threshold, "fired": self.fired}
