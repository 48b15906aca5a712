"""The OS boundary around generated code: bubblewrap (the default) or the weaker process guard.

``bubblewrap`` (``bwrap``, the sandbox under Flatpak; ``apt-get install bubblewrap``) starts each
sample in new user, pid, network, ipc, uts, cgroup and mount namespaces, so that the sample:

- sees only ``/usr`` (with the ``/bin``, ``/lib*`` links), the interpreter's own prefix (when it
  lives outside ``/usr``), a fresh ``/proc`` of its own pid namespace and a minimal ``/dev``, all
  read-only (the root and ``/dev`` are remounted read-only); no ``/etc``, no ``/home``, ``/root``,
  ``/work``, no run directory, no cache;
- writes only to ``/tmp``, a fresh tmpfs of ``Limits.scratch_mb`` that is also its working
  directory and ``HOME``, gone when it ends;
- runs as uid / gid 65534 inside its user namespace, may not create further user namespaces
  (``--disable-userns`` where bwrap has it, 0.8+; the seccomp filter below refuses unshare and
  new processes anyway), has no capabilities, and no network but its own loopback;
- has an environment of PATH, HOME, TMPDIR and LANG only: bwrap itself is started with that
  environment, because the sandbox's pid 1 is a copy of bwrap and ``/proc/1/environ`` would show
  whatever bwrap was started with (``--clearenv`` alone leaves the trainer's tokens there);
- dies with the trainer (``--die-with-parent``), and within its own session;
- before the sample's first line, installs a seccomp filter (:func:`seccomp_filter`) that
  refuses new processes (fork, vfork, clone without CLONE_THREAD; clone3 answers ENOSYS so
  threads fall back to clone), execve / execveat, unshare and setns. A filter cannot be
  removed, so no shell, no fork bomb, no exec of another program.

On top: the rlimits and the wall-clock timeout of :class:`safecl.evaluation.execution.Limits`.

``process`` keeps the older guard (a process of its own, an empty temporary directory, a
cleared environment, rlimits, ``unshare -n`` where allowed, ``nobody`` where it can run Python,
and a Python prelude): it stops accidents, not code written to escape. A recipe asks for it by
name (``sandbox: process``); bubblewrap missing is an error at validation, never a silent
fallback (:func:`bubblewrap_problem`).
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import sys
from functools import lru_cache

SANDBOXES = ("bubblewrap", "process")
INSTALL = "apt-get install bubblewrap"
SCRATCH = "/tmp"  # the sample's only writable folder, its cwd and HOME (a tmpfs)
SAMPLE = SCRATCH + "/sample.py"
ENV = {"PATH": "/usr/bin:/bin", "HOME": SCRATCH, "TMPDIR": SCRATCH, "LANG": "C.UTF-8"}

# seccomp: struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
# machine -> (AUDIT_ARCH, clone, clone3, syscalls refused with EPERM)
_SYSCALLS = {
    # x86_64: fork 57, vfork 58, execve 59, execveat 322, unshare 272, setns 308
    "x86_64": (0xC000003E, 56, 435, (57, 58, 59, 322, 272, 308)),
    # aarch64 has no fork / vfork: execve 221, execveat 281, unshare 97, setns 268
    "aarch64": (0xC00000B7, 220, 435, (221, 281, 97, 268)),
}


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_filter(machine: str | None = None) -> bytes:
    """A classic-BPF seccomp program (struct sock_filter[]) for this machine (module doc).

    Raises RuntimeError on a machine without a syscall table here (the sandbox then refuses to run)."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise RuntimeError(f"the bubblewrap sandbox has no seccomp syscall table for {machine!r} "
                           f"(known: {', '.join(_SYSCALLS)})")
    arch, clone, clone3, refused = _SYSCALLS[machine]
    prog = [_op(_LD_W_ABS, 4), _op(_JEQ, arch, 1, 0), _op(_RET, _KILL), _op(_LD_W_ABS, 0)]
    if machine == "x86_64":  # the x32 ABI (nr | 0x40000000) would reach the same calls by other numbers
        prog += [_op(_JGE, 0x40000000, 0, 1), _op(_RET, _ERRNO | _EPERM)]
    for nr in refused:
        prog += [_op(_JEQ, nr, 0, 1), _op(_RET, _ERRNO | _EPERM)]
    prog += [_op(_JEQ, clone3, 0, 1), _op(_RET, _ERRNO | _ENOSYS)]
    # clone: a thread (CLONE_THREAD in the flags, args[0]'s low word) is allowed, a process is not
    prog += [_op(_JEQ, clone, 0, 4), _op(_LD_W_ABS, 16), _op(_JSET, _CLONE_THREAD, 0, 1), _op(_RET, _ALLOW),
             _op(_RET, _ERRNO | _EPERM)]
    prog.append(_op(_RET, _ALLOW))
    return b"".join(prog)


def seccomp_prelude() -> str:
    """Python lines that install :func:`seccomp_filter` in the running process, or exit 97."""
    return f'''
import ctypes as _ct
class _Prog(_ct.Structure):
    _fields_ = [("len", _ct.c_ushort), ("filter", _ct.c_void_p)]
_buf = _ct.create_string_buffer({seccomp_filter()!r})
_prog = _Prog({len(seccomp_filter()) // 8}, _ct.addressof(_buf))
_libc = _ct.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [_ct.c_int, _ct.c_ulong, _ct.c_void_p, _ct.c_ulong, _ct.c_ulong]
if _libc.prctl(38, 1, None, 0, 0) != 0 or _libc.prctl(22, 2, _ct.addressof(_prog), 0, 0) != 0:
    import sys as _sys
    _sys.stderr.write("sandbox: the seccomp filter could not be installed (errno %d)\\n" % _ct.get_errno())
    _sys.exit(97)
del _Prog, _buf, _prog, _libc, _ct
'''


def interpreter() -> str:
    """The real interpreter the samples run (a virtualenv's python resolved to its base)."""
    return os.path.realpath(sys.executable)


def _binds() -> list[str]:
    """bwrap arguments for /usr, the /bin and /lib* links (or folders), and the interpreter's prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    bound = ["/usr"]
    for prefix in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(interpreter()))):
        real = os.path.realpath(prefix)
        if not any(real == b or real.startswith(b + os.sep) for b in bound):
            args += ["--ro-bind", real, real]
            bound.append(real)
    return args


def bubblewrap_command(program_fd: int, scratch_mb: int) -> list[str]:
    """The bwrap command line that runs the program in ``program_fd`` (copied to /tmp/sample.py)."""
    tool = shutil.which("bwrap")
    if tool is None:
        raise RuntimeError(f"bubblewrap (bwrap) is not installed; {INSTALL}")
    nested = ["--disable-userns"] if "--disable-userns" in _bwrap_help(tool) else []
    return [tool, "--unshare-all", "--unshare-user", *nested, "--die-with-parent", "--new-session",
            *_binds(), "--proc", "/proc", "--dev", "/dev",
            "--size", str(scratch_mb * 2**20), "--tmpfs", SCRATCH, "--ro-bind-data", str(program_fd), SAMPLE,
            "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SCRATCH,
            "--clearenv", *[a for k, v in ENV.items() for a in ("--setenv", k, v)],
            "--uid", "65534", "--gid", "65534", "--", interpreter(), "-I", "-S", "-B", SAMPLE]


@lru_cache(maxsize=4)
def _bwrap_help(tool: str) -> str:
    proc = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


@lru_cache(maxsize=1)
def bubblewrap_problem() -> str | None:
    """None when the bubblewrap sandbox runs here; else why not, with what to do (cached per process).

    Tried for real: a sample that installs the seccomp filter and prints a word, under the same
    command line every sample gets."""
    if shutil.which("bwrap") is None:
        return f"bubblewrap (bwrap) is not installed: {INSTALL} (Fedora: dnf install bubblewrap)"
    try:
        program = seccomp_prelude() + "\nprint('sandbox-ok')\n"
        fd = os.memfd_create("safecl-probe")
        try:
            os.write(fd, program.encode())
            os.lseek(fd, 0, os.SEEK_SET)
            proc = subprocess.run(bubblewrap_command(fd, 1), env=ENV, pass_fds=(fd,), capture_output=True,
                                  text=True, timeout=30, stdin=subprocess.DEVNULL)
        finally:
            os.close(fd)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"bubblewrap cannot run here: {exc}"
    if proc.returncode != 0 or "sandbox-ok" not in proc.stdout:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return f"bubblewrap is installed but cannot start a sandbox here: {last[:300]}"
    return None
