"""Scoring code by running it: HumanEval-style pass@k, each sample in its own sandbox.

A sample passes when ``program = code prompt + completion + test + check(entry_point)`` runs to
its end: the program prints a random token after ``check`` returns, and only exit status 0 with
that token counts (a completion that calls ``sys.exit(0)`` early fails). Generated code never
runs in the trainer's process, and only when the recipe opts in (``allow_code_execution``).

The boundary (``sandbox``, :mod:`safecl.evaluation.sandbox`):

- ``bubblewrap`` (default): each sample in new user, pid, network, ipc, uts, cgroup and mount
  namespaces (``bwrap``), seeing only ``/usr`` and the interpreter's prefix read-only and a
  fresh tmpfs as its only writable folder; uid 65534, no capabilities, no network, an
  environment of four variables, dead with the trainer; a seccomp filter refuses fork, exec,
  unshare and setns before the sample's first line. This is a boundary against code written to
  escape: no view of the trainer's files, environment or processes (``tests/test_escapes.py``
  tries each way out).
- ``process`` (asked for by name): a process of its own (``python -I``) in an empty temporary
  directory, removed afterwards, with an environment of PATH, HOME, TMPDIR; no network where
  ``unshare -n`` is allowed (``network_isolated()``); the ``nobody`` user when the trainer runs
  as root and ``nobody`` can read the interpreter; a Python prelude that refuses to open, remove
  or rename files outside the working directory and turns off ``os.system``, ``os.fork``,
  ``subprocess`` and ``shutil.rmtree``. It guards against accidents (loops, exits, huge
  allocations, stray writes), not against code written to escape: ctypes, ``_io`` and
  ``posix_spawn`` go around the prelude, and the sample sees the trainer's files.

Both: a wall-clock timeout (the process group is killed) and CPU-time, address-space (memory),
file-size and core limits (``resource.setrlimit``); the Python prelude runs in both.

pass@k over n samples with c passing (Chen et al. 2021), unbiased::

    pass@k = 1 - C(n - c, k) / C(n, k)

Greedy decoding gives one sample per problem: pass@1 = the share of problems solved.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from math import comb

from safecl.evaluation.sandbox import ENV as SANDBOX_ENV
from safecl.evaluation.sandbox import bubblewrap_command, bubblewrap_problem, seccomp_prelude

_PRELUDE = r'''
import builtins, io, os, sys
_ROOT = os.path.realpath(os.getcwd())
def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path))
    except TypeError:
        return True  # a file descriptor
    return p == _ROOT or p.startswith(_ROOT + os.sep)
def _guard(name):
    raise PermissionError(f"sandbox: {name} is turned off")
_open = builtins.open
def _safe_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the working directory: {file}")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _safe_open
_os_open = os.open
def _safe_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the working directory: {path}")
    return _os_open(path, flags, *args, **kwargs)
os.open = _safe_os_open
def _checked(fn, name):
    def wrapper(*paths, **kwargs):
        for p in paths[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: {name} outside the working directory: {p}")
        return fn(*paths, **kwargs)
    return wrapper
for _n in ("remove", "unlink", "rmdir", "rename", "replace", "mkdir", "makedirs", "chmod", "truncate"):
    if hasattr(os, _n):
        setattr(os, _n, _checked(getattr(os, _n), "os." + _n))
for _n in ("system", "fork", "forkpty", "execv", "execve", "execvp", "spawnv", "popen", "kill", "killpg", "setuid"):
    if hasattr(os, _n):
        setattr(os, _n, lambda *a, _n=_n, **k: _guard("os." + _n))
import shutil, subprocess
shutil.rmtree = lambda *a, **k: _guard("shutil.rmtree")
subprocess.Popen = lambda *a, **k: _guard("subprocess")
del _n
'''


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds per sample
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the sample may write
    scratch_mb: int = 64  # bubblewrap: size of the sample's only writable folder (a tmpfs)


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed: <last line of stderr>", "timeout", "no result"


@lru_cache(maxsize=1)
def network_isolated() -> bool:
    """True when ``unshare -n`` works here (the samples then run without a network)."""
    tool = shutil.which("unshare")
    if tool is None:
        return False
    try:
        return subprocess.run([tool, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limit(limits: Limits):
    def apply() -> None:
        import resource

        os.setsid()
        cpu = int(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        size = limits.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _others_can_run_python() -> bool:
    """Every folder above the interpreter's standard library is searchable by other users."""
    from pathlib import Path

    path = Path(sys.base_prefix).resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _nobody() -> tuple[int, int] | None:
    """(uid, gid) of ``nobody`` when the trainer runs as root and ``nobody`` can run this Python."""
    if os.geteuid() != 0 or not _others_can_run_python():
        return None
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (KeyError, ImportError):
        return None


def run_sample(program: str, limits: Limits = Limits(), sandbox: str = "bubblewrap") -> Outcome:
    """Run ``program`` in the sandbox (``bubblewrap`` or ``process``, module doc); it passes when it
    exits 0 having printed the token that :func:`humaneval_program` puts after its checks
    (``{TOKEN}`` in ``program`` is replaced). Raises RuntimeError when bubblewrap cannot run here."""
    token = secrets.token_hex(16)
    source = _PRELUDE + "\n" + program.replace("{TOKEN}", token)
    if sandbox == "bubblewrap":
        problem = bubblewrap_problem()
        if problem is not None:
            raise RuntimeError(f"sandbox bubblewrap: {problem}")
        fd = os.memfd_create("safecl-sample")
        try:
            os.write(fd, (seccomp_prelude() + source).encode())
            os.lseek(fd, 0, os.SEEK_SET)
            # bwrap starts with the sample's environment: its pid-1 copy keeps the one it was given
            proc = subprocess.Popen(bubblewrap_command(fd, limits.scratch_mb), env=dict(SANDBOX_ENV), pass_fds=(fd,),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", preexec_fn=_limit(limits))
        finally:
            os.close(fd)
        return _finish(proc, token, limits)
    if sandbox != "process":
        raise ValueError(f"sandbox {sandbox!r}: expected bubblewrap or process")
    work = tempfile.mkdtemp(prefix="safecl-exec-")
    drop = _nobody()
    try:
        if drop is not None:
            os.chown(work, *drop)
        path = os.path.join(work, "sample.py")
        # root: drop to nobody first thing (after `unshare -n`, which needs root, has run)
        drop_code = f"import os\nos.setgroups([])\nos.setgid({drop[1]})\nos.setuid({drop[0]})\n" if drop else ""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(drop_code + source)
        cmd = [sys.executable, "-I", "-B", path]
        if network_isolated():
            cmd = [shutil.which("unshare"), "-n", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                preexec_fn=_limit(limits))
        return _finish(proc, token, limits)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish(proc: subprocess.Popen, token: str, limits: Limits) -> Outcome:
    try:
        out, err = proc.communicate(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # bubblewrap: its sandbox dies with it (--die-with-parent)
        proc.communicate()
        return Outcome(False, "timeout")
    if proc.returncode == 0 and token in out:
        return Outcome(True, "passed")
    last = (err.strip().splitlines() or [f"exit status {proc.returncode}, no result"])[-1]
    return Outcome(False, f"failed: {last[:200]}")


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(response: str) -> str:
    """The code of a response: its first fenced block when there is one, else the whole text."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


def humaneval_program(code_prompt: str, response: str, test: str, entry_point: str) -> str:
    """The program of one HumanEval sample. A response that defines ``entry_point`` itself is run
    as it is (after the prompt's imports); otherwise it is taken as the body that follows the prompt."""
    code = extract_code(response)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        imports = "\n".join(line for line in code_prompt.splitlines() if line.startswith(("import ", "from ")))
        body = f"{imports}\n{code}"
    else:
        body = code_prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\nprint('{{TOKEN}}')\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (module doc)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
