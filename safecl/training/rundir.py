"""The run directory, in one place.

    <output_dir>/
      .lock                         who is writing the run (pid, host, since); see RunLock
      recipe.resolved.yaml          the recipe with every default filled in
      run.json                      status (running / completed / halted), stage list, timings
      retention.json                the R matrix (base row, then one per stage)
      stages/<NN>-<name>/
        adapter/                    cumulative adapter after this stage (PEFT LoRA format)
        mask.safetensors            lori-s: the B entries this stage owns (bool, PEFT lora_B keys)
        metrics.json                training, data, mask and retention numbers of the stage

Every file is written to a temporary name and renamed, so a crash never leaves half a file; a
stage's run.json entry records its files' checksums (:mod:`safecl.integrity`).

One writer at a time: :class:`RunLock` holds an OS file lock (``fcntl.flock``) on ``.lock``
for the whole run. The kernel drops it when the process ends, however it ends (SIGKILL, power
loss), so a dead run never blocks the next command and a live one always does.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safecl.atomic import write_json, write_text
from safecl.errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per directory is then the user's care
    fcntl = None

__all__ = ["stage_dir", "read_json", "write_json", "write_text", "RunLock"]
LOCK = ".lock"


def stage_dir(root: str | Path, index: int, name: str) -> Path:
    return Path(root) / "stages" / f"{index:02d}-{name}"


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class RunLock:
    """``with RunLock(out):`` the calling process is the only writer of ``out``.

    Taken before anything is written (the MLflow store included) and held until the run ends.
    A second process gets a :class:`TrainingError` (exit 2) naming the holder and since when.
    The lock file stays behind with the last holder's details; only the OS lock counts.
    """

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self._fh = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise TrainingError(f"cannot write to output_dir {self.path.parent}: {exc.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                h = self.holder()
                who = f"process {h.get('pid', '?')} on {h.get('host', '?')} ({h.get('command', 'safecl train')}), " \
                      f"since {h.get('since', '?')}"
                raise TrainingError(f"output_dir {self.path.parent} is in use by {who}; wait for it to end or stop "
                                    "it, then run your command again (a stopped run continues with --resume)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join(["safecl", *sys.argv[1:]])[:300]}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None
