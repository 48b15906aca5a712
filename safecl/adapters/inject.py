"""Putting LoRI layers into a model, and handling them as one adapter.

Target matching follows PEFT's rule, so an exported adapter loads in vanilla PEFT: a linear
named ``n`` is wrapped when ``n == t`` or ``n`` ends with ``"." + t`` for a target ``t``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from safecl.adapters.layer import LoRILinear
from safecl.errors import ModelError


def matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_adapters(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int,
                    train_A: bool, dropout: float = 0.0) -> dict[str, LoRILinear]:
    """Replace every targeted ``nn.Linear`` by a :class:`LoRILinear`; returns them by module name.

    Raises ModelError naming some linear layers when no target matches.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, targets)]
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"adapter.target_modules {targets} match no linear layer; this model's linears: {linears}")
    layers: dict[str, LoRILinear] = {}
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRILinear(linear, name, rank, alpha, seed, train_A=train_A, dropout=dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def trainable_parameters(layers: dict[str, LoRILinear]) -> list[nn.Parameter]:
    params = []
    for layer in layers.values():
        params += [p for p in (layer.delta, layer.values) if p is not None]
        if layer.train_A:
            params.append(layer.A)
    return params


def snapshot(layers: dict[str, LoRILinear]) -> dict[str, torch.Tensor]:
    """Copies of every A and B_frozen (the committed adapter), for rollback and invariants."""
    out = {}
    for name, layer in layers.items():
        out[f"{name}.A"] = layer.A.detach().clone()
        out[f"{name}.B"] = layer.B_frozen.detach().clone()
    return out


def restore(layers: dict[str, LoRILinear], snap: dict[str, torch.Tensor]) -> None:
    """Put a :func:`snapshot` back, bit for bit, dropping any trainable stage part."""
    with torch.no_grad():
        for name, layer in layers.items():
            layer.discard_stage()
            layer.A.copy_(snap[f"{name}.A"])
            layer.B_frozen.copy_(snap[f"{name}.B"])


@contextmanager
def stage_switched_off(layers: dict[str, LoRILinear]):
    """Within the block the model is exactly the model before the current stage (every layer's
    trainable part off, lora's A as it was when the stage began): the free teacher of the
    safety anchors. Restores each layer's switch on exit, also on error."""
    previous = {name: layer.stage_enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.stage_enabled = False
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.stage_enabled = previous[name]


@contextmanager
def adapters_off(layers: dict[str, LoRILinear]):
    """Within the block every adapter adds exactly 0 (scaling 0): the base model, bit for bit
    (y + 0 = y). Restores each layer's scaling on exit, also on error."""
    previous = {name: layer.scaling for name, layer in layers.items()}
    for layer in layers.values():
        layer.scaling = 0.0
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.scaling = previous[name]
