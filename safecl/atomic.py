"""Writing files and folders so that a crash never leaves half of one.

A file is written to a temporary name in its folder, flushed to disk and renamed over the
target (``os.replace`` is atomic on one filesystem). A folder is built in a temporary sibling
and swapped in: the old one is renamed aside first, because a rename cannot replace a
non-empty folder, then removed.

A failed write (a full disk: ENOSPC) removes its temporary file or folder, leaves the target as
it was, and raises an OSError that names the target (Python's own names no file for a failed
``write``), so the message can say where the disk is full. Each write passes the fault point
``write/<name>`` (:mod:`safecl.faults`) while its temporary file exists.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safecl.faults import WRITE, fault_point


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _named(exc: OSError, target: Path, tmp: Path | None = None) -> OSError:
    """``exc`` with the target's path when it names none (a failed write or fsync) or names a
    file inside the temporary folder ``tmp`` (then: the same file under ``target``)."""
    if exc.filename is None:
        return OSError(exc.errno, exc.strerror, str(target))
    if tmp is not None and Path(exc.filename).is_relative_to(tmp):
        return OSError(exc.errno, exc.strerror, str(target / Path(exc.filename).relative_to(tmp)))
    return exc


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fault_point(WRITE + path.name, path)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _named(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an
    error it becomes ``target`` (replacing any old one), otherwise it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        try:
            yield tmp
            fault_point(WRITE + target.name, target)
        except OSError as exc:
            raise _named(exc, target, tmp) from exc
        if target.exists():
            old = target.with_name(f".old{tmp.name}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a writer that takes a path (safetensors);
    when the block ends without an error it is renamed over ``target``, otherwise removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            fault_point(WRITE + target.name, target)
        except OSError as exc:
            raise _named(exc, target) from exc
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
