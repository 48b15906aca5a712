"""Named fault points (tests interrupt a run at a chosen moment, never by sleeping) and the
interrupt guard (a Ctrl-C is never lost).

Interrupt guard (:func:`guard_interrupts`, installed by ``safecl train``): Ctrl-C raises
KeyboardInterrupt at once, as Python's own handler does, and is also remembered. Python drops
an exception raised while a finalizer runs (``__del__``, a weakref callback: database
connections are closed that way) and prints "Exception ignored in ..." with a traceback; the
run would then go on as if no one had pressed Ctrl-C. Under the guard such a KeyboardInterrupt
is not printed, and every fault point below raises it again, so the run stops at the next one.

The environment variable ``SAFECL_FAULT="POINT[@N][:ACTION]"`` acts the N-th time (default:
the first) the process reaches ``fault_point(POINT)``; unset, a fault point costs one dict
lookup. With ``SAFECL_FAULT_RANK=R`` only the process of rank R (``RANK`` as torchrun sets it)
acts, the others go on (one rank of a distributed run dies or hangs). ACTION is

- ``interrupt`` (default): raise KeyboardInterrupt there, as Ctrl-C would;
- ``kill``: end the process at once with ``os._exit(137)``, as SIGKILL would (no ``finally``,
  no atexit, no flush);
- ``wait``: create ``$SAFECL_FAULT_DIR/POINT.reached`` and block until the test creates
  ``$SAFECL_FAULT_DIR/POINT.release`` (for two processes racing on one run directory, or an
  audit beside a live run);
- ``enospc``: raise ``OSError(ENOSPC)`` naming the file being written, as a full disk would.

Points (in the order a run reaches them):
``adopt.copy`` (``--from RUN:STAGE``: before each file of the adopted stages is copied),
``store`` (before the MLflow store is created), ``store.migrated`` (the store's schema is
built under its temporary name, not yet renamed into place), ``started`` (run.json written,
before the base check), ``step`` (after an optimizer step and its checkpoint, if any),
``check`` (a retention check has generated and judged, nothing of it written yet),
``commit.adapter`` (a stage's adapter is written, its mask and metrics not yet),
``commit.files`` (every file of the stage is written, its run.json entry not yet),
``end`` (every stage committed, before run.json says completed).

Write points: every file safecl writes passes ``write/<name>`` (its file or folder name) once
the write has begun and before it lands under its name: ``write/run.json``, ``write/metrics.json``,
``write/answers.jsonl``, ``write/retention.json``, ``write/mask.safetensors``, ``write/adapter``
(the adapter folder), ``write/checkpoint`` (a mid-stage checkpoint folder), ``write/mlflow.db``
(the MLflow store: its creation and every logging call), ``write/mlartifacts`` (an MLflow
artifact), ``write/report.html`` (``safecl audit --report``), ... ``write/run.json@2:enospc``:
the second write of run.json (the first stage's commit) finds the disk full.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

POINTS = ("store", "store.migrated", "started", "step", "check", "commit.adapter", "commit.files", "end", "adopt.copy")
ACTIONS = ("interrupt", "kill", "wait", "enospc")
WRITE = "write/"  # prefix of the write points: write/<file name>
_seen: dict[str, int] = {}
_pending = False  # a Ctrl-C arrived and may have been swallowed


def guard_interrupts() -> None:
    """Install the interrupt guard (module doc) unless SIGINT is ignored or handled by someone else."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def on_sigint(signum, frame):
        global _pending
        _pending = True
        raise KeyboardInterrupt

    previous = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt):
            return  # remembered in _pending; raised again at the next fault point
        previous(info)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable


def parse(spec: str) -> tuple[str, int, str]:
    """``"step@3:kill"`` -> ("step", 3, "kill"); raises ValueError on an unknown point or action."""
    where, _, action = spec.partition(":")
    point, _, nth = where.partition("@")
    action = action or "interrupt"
    known = point in POINTS or (point.startswith(WRITE) and len(point) > len(WRITE))
    if not known or action not in ACTIONS or (nth and not nth.isdigit()):
        raise ValueError(f"SAFECL_FAULT={spec!r}: expected POINT[@N][:ACTION], POINT one of {', '.join(POINTS)} "
                         f"or {WRITE}<file name>, ACTION one of {', '.join(ACTIONS)}")
    return point, int(nth or 1), action


def fault_point(name: str, path: str | os.PathLike | None = None) -> None:
    """Raise a pending Ctrl-C; act here if ``SAFECL_FAULT`` names this point and this is its N-th
    visit. ``path``: the file a write point writes (named by ``enospc``)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt("interrupted earlier; stopping at a safe point")
    spec = os.environ.get("SAFECL_FAULT")
    if not spec:
        return
    point, nth, action = parse(spec)
    if point != name:
        return
    rank = os.environ.get("SAFECL_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != nth:
        return
    if action == "kill":
        os._exit(137)
    if action == "wait":
        folder = Path(os.environ.get("SAFECL_FAULT_DIR", "."))
        (folder / f"{name}.reached").write_text(str(os.getpid()))
        while not (folder / f"{name}.release").exists():
            time.sleep(0.01)
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path) if path is not None else name)
    raise KeyboardInterrupt(f"fault point {name}")


def reset() -> None:
    """Forget the visits counted so far and any pending interrupt (an in-process test runs several commands)."""
    global _pending
    _seen.clear()
    _pending = False
