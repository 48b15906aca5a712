"""Mid-stage checkpoints and resuming a run directory.

A mid-stage checkpoint (``stages/<NN>-<name>/checkpoint/``, written every
``checkpoint_every`` optimizer steps through a temp dir and a rename) holds:
``trainable.safetensors`` (this stage's trainable tensors: ``values``/``delta`` and A for
lora), ``mask.safetensors`` (lori-s), and ``state.pt`` (step, optimizer and scheduler
state, losses and learning rates so far, the torch RNG state, calibration metrics), loaded
with ``torch.load(weights_only=True)``. The data order needs no state: it is a seeded
permutation per epoch, and resuming skips the micro-batches already consumed.

A stage is *complete* once it has an entry in run.json (written after its retention check
and gate); its checkpoint dir is then removed. On resume, completed stages are rebuilt from
their saved adapters and masks, never recomputed. An unreadable checkpoint is not committed
state: the stage then trains from its start (:func:`readable_checkpoint`). ``--restart-from
STAGE`` drops that stage and every later one from the run's record and disk
(:func:`forget_stages`), so they train again while earlier stages stay bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from safecl.adapters.export import load_adapter_tensors, load_mask, module_name, save_mask
from safecl.adapters.layer import LoRILinear
from safecl.atomic import atomic_directory
from safecl.errors import TrainingError
from safecl.recipe.base import flatten_keys
from safecl.recipe.schema import Recipe
from safecl.training.rundir import stage_dir

# Recipe keys whose change does not invalidate what was trained (eval and tracking settings, and
# output_dir: a run directory moved or copied elsewhere resumes where it is).
SAFE_TO_CHANGE = ("retention", "gate", "tracking", "output_dir")


def save_checkpoint(directory: Path, step: int, layers: dict[str, LoRILinear], optimizer, scheduler, loop_state: dict,
                    mask: dict | None, extra: dict) -> None:
    tensors = {}
    for name, layer in layers.items():
        for attr in ("delta", "values"):
            p = getattr(layer, attr)
            if p is not None:
                tensors[f"{name}.{attr}"] = p.detach().cpu().contiguous()
        if layer.train_A:
            tensors[f"{name}.A"] = layer.A.detach().cpu().contiguous()
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / "trainable.safetensors")
        if mask is not None:
            save_mask(mask, tmp / "mask.safetensors")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "loop": loop_state, "rng": torch.get_rng_state(), **extra}, tmp / "state.pt")


def load_checkpoint(directory: Path) -> dict | None:
    """The checkpoint's state (with ``trainable`` tensors and ``mask``), or None if there is none."""
    directory = Path(directory)
    if not (directory / "state.pt").is_file():
        return None
    state = torch.load(directory / "state.pt", weights_only=True)
    state["trainable"] = load_file(directory / "trainable.safetensors")
    state["mask"] = load_mask(directory / "mask.safetensors") if (directory / "mask.safetensors").is_file() else None
    return state


def apply_trainable(layers: dict[str, LoRILinear], tensors: dict[str, torch.Tensor]) -> None:
    """Put checkpointed trainable tensors into layers already in the stage's mode."""
    with torch.no_grad():
        for key, value in tensors.items():
            name, _, attr = key.rpartition(".")
            getattr(layers[name], attr).copy_(value)


def load_stage_adapter(layers: dict[str, LoRILinear], adapter_dir: Path) -> None:
    """Set every layer's A and B_frozen from a saved (cumulative) PEFT adapter."""
    tensors = load_adapter_tensors(adapter_dir)
    with torch.no_grad():
        for key, value in tensors.items():
            layer = layers[module_name(key)]
            (layer.A if ".lora_A." in key else layer.B_frozen).copy_(value)


def recipe_changes(old_yaml: str, new_yaml: str) -> tuple[list[str], list[str]]:
    """(unsafe changed keys, safe changed keys) between two resolved recipes."""
    a, b = flatten_keys(yaml.safe_load(old_yaml)), flatten_keys(yaml.safe_load(new_yaml))
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    safe = [k for k in changed if k.split(".")[0] in SAFE_TO_CHANGE or ".eval." in f".{k}."]
    return [k for k in changed if k not in safe], safe


def check_resumable(out: Path, resolved: str) -> None:
    prev = out / "recipe.resolved.yaml"
    if not prev.is_file():
        raise TrainingError(f"--resume: {out} holds no run (no recipe.resolved.yaml); start it without --resume")
    unsafe, _ = recipe_changes(prev.read_text(encoding="utf-8"), resolved)
    if unsafe:
        raise TrainingError(f"--resume: the recipe changed since the run in {out} started; changed keys: "
                            f"{', '.join(unsafe)}. Only eval settings ({', '.join(SAFE_TO_CHANGE[:3])}, stages.N.eval) "
                            "and output_dir may change on resume; start a new output_dir instead")


def readable_checkpoint(sdir: Path, echo) -> dict | None:
    """The stage's mid-stage checkpoint, or None (with a note) when it is unreadable: it is not
    committed state, so the stage then trains again from its start."""
    try:
        return load_checkpoint(sdir / "checkpoint")
    except Exception as exc:  # noqa: BLE001 - any damage means the same: do not trust it
        echo(f"[safecl] {sdir / 'checkpoint'} is unreadable ({type(exc).__name__}); the stage trains from its start")
        return None


def forget_stages(recipe: Recipe, run_info: dict, previous: dict, name: str, out: Path, main: bool, echo) -> dict:
    """--restart-from NAME: drop NAME and every later stage (and their repair passes) from the
    run's record and disk, so they train again; returns ``previous`` without their MLflow runs."""
    names = [s.name for s in recipe.stages]
    if name not in names:
        raise TrainingError(f"--restart-from {name}: no such stage; the recipe's stages are {', '.join(names)}")
    later = set(names[names.index(name):])
    dropped = [e for e in run_info["stages"] if e["name"] in later or e.get("repair_of") in later]
    run_info["stages"] = [e for e in run_info["stages"] if e not in dropped]
    if main:
        for i in range(names.index(name), len(names)):
            shutil.rmtree(stage_dir(out, i, names[i]), ignore_errors=True)
        for e in dropped:
            shutil.rmtree(out / e["dir"], ignore_errors=True)
    echo(f"[safecl] --restart-from {name}: stages {', '.join(n for n in names if n in later)} train again")
    mlflow = dict(previous.get("mlflow") or {})
    mlflow["children"] = {k: v for k, v in (mlflow.get("children") or {}).items()
                          if k not in {e["name"] for e in dropped}}
    return {**previous, "mlflow": mlflow}
