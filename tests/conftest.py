"""Shared fixtures: tiny models built from a config, small data files, paths to ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOKE = ROOT / "recipes" / "smoke.yaml"


@pytest.fixture
def tiny():
    """(model, tokenizer) of the built-in tiny Llama, seed 0."""
    from safecl.models import load_model_and_tokenizer
    from safecl.recipe.schema import ModelConfig

    return load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def arithmetic_file(tmp_path) -> Path:
    rows = [{"instruction": f"What is {i} plus {i + 1}?", "input": "", "output": f"The answer is {2 * i + 1}.",
             "answer": str(2 * i + 1)} for i in range(40)]
    return write_jsonl(tmp_path / "arith.jsonl", rows)


def recommit(run) -> None:
    """Record the current checksums of a run's stage files in its run.json, for tests that
    fabricate or edit committed files on purpose (safecl would otherwise call them damaged)."""
    import json

    from safecl.integrity import digests

    info_path = Path(run) / "run.json"
    info = json.loads(info_path.read_text())
    for entry in info.get("stages", []):
        entry["files"] = digests(Path(run) / entry["dir"])
    info_path.write_text(json.dumps(info, indent=2))


def train_smoke(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    """Train the smoke recipe with ``overrides`` into a fresh folder (in-process); its output_dir."""
    from safecl.cli import main

    out = tmp_path_factory.mktemp(name) / "run"
    assert main(["train", str(SMOKE), f"output_dir={out}", *overrides]) == 0
    return out



def two_stage_smoke(folder: Path) -> Path:
    """The smoke recipe cut to its safety and arithmetic stages, written in ``folder``."""
    import yaml

    data = yaml.safe_load(SMOKE.read_text())
    data["stages"] = data["stages"][:2]
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

@pytest.fixture(autouse=True)
def _torch_global_state_is_left_as_found():
    """A test that turns autograd off globally (or changes the default dtype) breaks tests that run
    after it, far from the cause: fail the test that leaked it instead, and restore the state."""
    import torch

    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    yield
    leaked = (torch.is_grad_enabled(), torch.get_default_dtype()) != (grad, dtype)
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)
    assert not leaked, "this test left torch's grad mode or default dtype changed"
