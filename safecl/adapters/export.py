"""Writing adapters and masks in PEFT's LoRA format.

An exported adapter is the cumulative one (every committed stage): ``lora_A = A``,
``lora_B = B_frozen`` (dense), ``lora_alpha = alpha``, ``r = rank``, so that PEFT computes
exactly ``W x + (alpha/r) B A x`` as safecl does. It loads with
``peft.PeftModel.from_pretrained(base_model, path)``.

Masks are bool tensors keyed by the PEFT ``lora_B`` parameter name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safecl.adapters.layer import LoRILinear
from safecl.atomic import atomic_directory, atomic_file
from safecl.errors import SafeclError

PREFIX = "base_model.model."


def peft_key(module_name: str, which: str) -> str:
    return f"{PREFIX}{module_name}.lora_{which}.weight"


def module_name(peft_name: str) -> str:
    name = peft_name[len(PREFIX):] if peft_name.startswith(PREFIX) else peft_name
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def adapter_tensors(layers: dict[str, LoRILinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in layers.items():
        out[peft_key(name, "A")] = layer.A.detach().float().cpu().contiguous()
        out[peft_key(name, "B")] = layer.effective_B().detach().float().cpu().contiguous()
    return out


def write_peft_adapter(tensors: dict[str, torch.Tensor], directory: str | Path, *, rank: int, alpha: float,
                       targets: list[str], base_model: str | None, dropout: float = 0.0,
                       metadata: dict[str, str] | None = None,
                       finish: Callable[[Path], None] | None = None) -> Path:
    """Write PEFT-keyed LoRA tensors as adapter_config.json + adapter_model.safetensors, atomically.

    ``finish(tmp)``: called with the temporary directory once both files are in it, to add
    more files (a provenance record) that appear in the same atomic swap."""
    from peft import LoraConfig

    with atomic_directory(directory) as tmp:
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                   base_model_name_or_path=base_model, bias="none").save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt", **(metadata or {})})
        if finish is not None:
            finish(tmp)
    return Path(directory)


def save_peft_adapter(layers: dict[str, LoRILinear], directory: str | Path, *, rank: int, alpha: float,
                      targets: list[str], base_model: str | None, dropout: float = 0.0,
                      extra: dict | None = None) -> Path:
    """The layers' cumulative adapter in PEFT format (``extra`` goes into the safetensors metadata)."""
    return write_peft_adapter(adapter_tensors(layers), directory, rank=rank, alpha=alpha, targets=sorted(targets),
                              base_model=base_model, dropout=dropout, metadata={"safecl": json.dumps(extra or {})})


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``load_file`` that names the file when it is missing or damaged (SafeclError, exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise SafeclError(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SafeclError(f"{path}: not a readable safetensors file ({exc}); it is damaged (truncated or "
                          "overwritten)") from None


def load_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(directory) / "adapter_model.safetensors")


def save_mask(mask: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({peft_key(n, "B"): m.to(torch.bool).contiguous() for n, m in mask.items()}, tmp)
    return path


def load_mask(path: str | Path) -> dict[str, torch.Tensor]:
    return {module_name(k): v for k, v in read_safetensors(path).items()}
