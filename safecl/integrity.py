"""Committed state carries its checksums, and whoever reads it checks them first.

A stage is committed when its entry lands in run.json (one atomic write). That entry records
the SHA-256 of every file the stage committed, relative to its folder::

    {"name": "gsm8k", "dir": "stages/01-gsm8k", ..., "files": {"metrics.json": "9f2c...",
     "mask.safetensors": "...", "adapter/adapter_model.safetensors": "...", ...}}

``--resume``, ``audit``, ``compact``, ``merge`` and ``--from`` verify a stage's files against
its entry before reading them, so a truncated or altered file (a disk fault, a bad copy) is
named with its stage and the command that rebuilds it, never half-read. Invariant: every file
listed exists and hashes to its digest; a stage entry without ``files`` (a run written by an
older safecl) is read unchecked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safecl.errors import SafeclError

# What a stage commits (the ones present are recorded).
COMMITTED = ("metrics.json", "answers.jsonl", "mask.safetensors", "mask.rolled_back.safetensors", "refusal_direction.safetensors",
             "refusal_probe.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json")


class CorruptStage(SafeclError):
    """A committed file is missing or differs from the digest written at its commit (exit 2)."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digests(stage_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of the committed files present in ``stage_dir``."""
    stage_dir = Path(stage_dir)
    return {rel: sha256(stage_dir / rel) for rel in COMMITTED if (stage_dir / rel).is_file()}


def damaged(stage_dir: str | Path, expected: dict[str, str] | None) -> list[str]:
    """The files of ``expected`` that are missing or differ ("mask.safetensors (missing)")."""
    stage_dir = Path(stage_dir)
    bad = []
    for rel, digest in sorted((expected or {}).items()):
        path = stage_dir / rel
        if not path.is_file():
            bad.append(f"{path} (missing)")
        elif sha256(path) != digest:
            bad.append(f"{path} (size {path.stat().st_size} bytes; its checksum differs from the one written at commit)")
    return bad


def verify_stage(stage_dir: str | Path, entry: dict, next_step: str | None = None) -> None:
    """Raise :class:`CorruptStage` naming the stage, every damaged file and ``next_step``."""
    bad = damaged(stage_dir, entry.get("files"))
    if bad:
        how = f"; to rebuild it: {next_step}" if next_step else ""
        raise CorruptStage(f"stage '{entry.get('name')}' is damaged: {'; '.join(bad)}{how}")


def verify_run(run_dir: str | Path, only: list[Path] | None = None) -> None:
    """Verify the committed stages recorded in ``run_dir``/run.json (those whose folder is in
    ``only``, when given). A missing or unreadable run.json verifies nothing (audit warns)."""
    run_dir = Path(run_dir)
    try:
        entries = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("stages") or []
    except (OSError, ValueError, AttributeError):
        return
    wanted = None if only is None else {Path(p).resolve() for p in only}
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("dir"):
            continue
        folder = run_dir / entry["dir"]
        if wanted is None or folder.resolve() in wanted:
            verify_stage(folder, entry, f"safecl train RECIPE --resume --restart-from {entry.get('name')} "
                                        f"(RECIPE: the one that wrote {run_dir})")


def verify_adapter(adapter_dir: str | Path) -> None:
    """An adapter folder inside a run (``<run>/stages/NN-name/adapter``): verify its stage."""
    stage = Path(adapter_dir).resolve().parent
    if stage.parent.name == "stages":
        verify_run(stage.parent.parent, only=[stage])
