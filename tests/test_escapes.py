"""The escape battery: one-line programs that try to get out of the sandbox, each run through
``run_sample`` by a real trainer process (started with a secret ``HF_TOKEN`` in its environment,
as a user's shell would give it) beside marker files, a home cache and a run directory.

A program prints the pass token only when its escape worked, so ``passed`` means "escaped"; the
test then also looks from outside: marker files as they were, nothing written, the trainer
alive, not signalled, its environment unchanged.

Under ``bubblewrap`` every escape fails. Under ``process`` (asked for by name) the same battery
records which escapes succeed, asserted as observed here so the documented table stays true
(some depend on who runs the trainer: as root with Python where ``nobody`` can reach it, the
sample runs as ``nobody``; here Python lives under /root, so it runs as root).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from safecl.evaluation import sandbox
from safecl.evaluation.execution import _nobody, network_isolated
from tests.conftest import ROOT

SECRET = "hf_escape_battery_secret"
NO_BWRAP = sandbox.bubblewrap_problem()
BWRAP = pytest.param("bubblewrap", marks=pytest.mark.skipif(
    NO_BWRAP is not None, reason=f"{NO_BWRAP} (CI installs it: {sandbox.INSTALL})"))

LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# name -> (program, does it succeed under `process` here: "yes", "no", "same-user" (unless the
# sample runs as nobody), "network" (unless `unshare -n` is allowed))
ESCAPES = {
    "read the trainer's environment (/proc/PPID/environ)": (
        "import os\nfound = False\n"
        "for pid in {os.getppid(), {TRAINER}, 1}:\n"
        "    try:\n        found |= {SECRET!r}.encode() in open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n        pass\nif found:\n    print('{TOKEN}')\n", "same-user"),
    "delete a file outside (ctypes unlink)": (
        LIBC + "if libc.unlink({MARKER!r}.encode()) == 0:\n    print('{TOKEN}')\n", "same-user"),
    "write a file outside (_io.FileIO)": (
        "import _io\n_io.FileIO({OUTSIDE!r}, 'w').write(b'escaped')\nprint('{TOKEN}')\n", "same-user"),
    "start a shell (os.posix_spawn /bin/sh)": (
        "import os\npid = os.posix_spawn('/bin/sh', ['sh', '-c', 'exit 7'], {})\n"
        "if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7:\n    print('{TOKEN}')\n", "yes"),
    "fork (ctypes fork)": (
        LIBC + "pid = libc.fork()\nif pid == 0:\n    libc._exit(0)\nif pid > 0:\n    os.waitpid(pid, 0)\n"
        "    print('{TOKEN}')\n", "yes"),
    "fork bomb (64 forks, bounded so a failing sandbox cannot hurt the machine)": (
        LIBC + "n = 0\nfor _ in range(64):\n    pid = libc.fork()\n    if pid == 0:\n        libc._exit(0)\n"
        "    if pid < 0:\n        break\n    n += 1\n    os.waitpid(pid, 0)\nif n == 64:\n    print('{TOKEN}')\n", "yes"),
    "signal the trainer (ctypes kill SIGUSR1 to its pid and to the parent)": (
        LIBC + "import signal\nlibc.kill(os.getppid(), signal.SIGUSR1)\n"
        "if libc.kill({TRAINER}, signal.SIGUSR1) == 0:\n    print('{TOKEN}')\n", "same-user"),
    "kill the trainer (os.kill, then posix.kill around the prelude, SIGKILL)": (
        "import os, posix, signal\n"
        "for kill in (os.kill, posix.kill):\n"
        "    for pid in (os.getppid(), {TRAINER}):\n"
        "        try:\n            kill(pid, signal.SIGKILL)\n        except (OSError, PermissionError):\n            pass\n"
        "print('{TOKEN}')  # still alive means nothing stopped it from trying: the trainer's fate is checked outside\n",
        "same-user"),
    "run as root": ("import os\nif 0 in (os.getuid(), os.geteuid()):\n    print('{TOKEN}')\n", "root"),
    "a 100 GB sparse file": (
        "import os\nwith open('big', 'wb') as f:\n    f.seek(100 * 2**30)\n    f.write(b'x')\n"
        "if os.stat('big').st_size > 100 * 2**30:\n    print('{TOKEN}')\n", "no"),
    "read ~/.cache (the trainer's Hugging Face token)": (
        "if open({CACHE!r}).read() == {SECRET!r}:\n    print('{TOKEN}')\n", "same-user"),
    "read the run directory": (
        "if {SECRET!r} in open({RUN!r}).read():\n    print('{TOKEN}')\n", "same-user"),
    "connect a socket (to a listener of the trainer's on 127.0.0.1)": (
        "import socket\nsocket.create_connection(('127.0.0.1', {PORT}), timeout=2).close()\nprint('{TOKEN}')\n",
        "network"),
}

TRAINER = r"""
import json, os, signal, sys
from safecl.evaluation.execution import Limits, run_sample
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
before = dict(os.environ)
# a generous timeout: on a loaded machine the sample is slow, which is no escape
out = run_sample(sys.argv[2].replace("{TRAINER}", str(os.getpid())), Limits(timeout=30.0), sys.argv[1])
print(json.dumps({"escaped": out.passed, "status": out.status, "signalled": bool(got),
                  "env_same": dict(os.environ) == before}))
"""


def expected_under_process(kind: str) -> bool:
    dropped = _nobody() is not None
    return {"yes": True, "no": False, "same-user": not dropped, "root": os.geteuid() == 0 and not dropped,
            "network": not network_isolated()}[kind]


@pytest.fixture
def scene(tmp_path):
    """Marker files, a home cache and a run directory the sample must not reach; a listening socket."""
    home = tmp_path / "home"
    cache = home / ".cache" / "huggingface" / "token"
    cache.parent.mkdir(parents=True)
    cache.write_text(SECRET)
    run = tmp_path / "runs" / "demo" / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps({"status": "running", "note": SECRET}))
    marker = tmp_path / "marker.txt"
    marker.write_text("keep me")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    yield {"home": home, "MARKER": str(marker), "OUTSIDE": str(tmp_path / "outside.txt"), "CACHE": str(cache),
           "RUN": str(run), "PORT": listener.getsockname()[1], "SECRET": SECRET}
    listener.close()


def attempt(kind: str, program: str, scene: dict) -> dict:
    fields = {k: v for k, v in scene.items() if k != "home"}
    for key, value in fields.items():
        program = program.replace(f"{{{key}!r}}", repr(value)).replace(f"{{{key}}}", str(value))
    env = {"PATH": os.environ["PATH"], "HOME": str(scene["home"]), "HF_TOKEN": SECRET}
    trainer = subprocess.run([sys.executable, "-c", TRAINER, kind, program], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    if trainer.returncode == -9:
        return {"escaped": True, "status": "the trainer was killed", "killed": True}
    assert trainer.returncode == 0, trainer.stderr[-2000:]
    result = json.loads(trainer.stdout.strip().splitlines()[-1])
    assert result["env_same"]  # the trainer's own environment, after the sample
    return {**result, "killed": False}


def escaped(result: dict, scene: dict, name: str) -> bool:
    """What the sample got: its own word (the token) or what is seen from outside."""
    outside = (open(scene["MARKER"]).read() != "keep me" if os.path.exists(scene["MARKER"]) else True,
               os.path.exists(scene["OUTSIDE"]), result["signalled"] if "signalled" in result else False,
               result["killed"])
    if name.startswith("kill the trainer"):
        return result["killed"]  # the sample always "passes": only the trainer's death counts
    return result["escaped"] or any(outside)


@pytest.mark.parametrize("name", list(ESCAPES))
@pytest.mark.parametrize("kind", [BWRAP, "process"])
def test_escape(kind, name, scene):
    program, under_process = ESCAPES[name]
    result = attempt(kind, program, scene)
    got = escaped(result, scene, name)
    if kind == "bubblewrap":
        assert not got, f"{name}: escaped the bubblewrap sandbox ({result})"
        assert open(scene["MARKER"]).read() == "keep me" and not os.path.exists(scene["OUTSIDE"])
        assert not result["killed"] and not result["signalled"]
    else:  # documents the weaker guard (module doc); the README's table is this one
        assert got == expected_under_process(under_process), f"{name} under process: {result}"


def test_the_sandbox_boundary_as_the_sample_sees_it(scene):
    """From inside: uid 65534, only its own processes, no trainer files, a read-only root, one
    writable tmpfs, five environment variables (PWD set by bwrap)."""
    if NO_BWRAP is not None:
        pytest.skip(f"{NO_BWRAP} (CI installs it: {sandbox.INSTALL})")
    program = (
        "import os, json\n"
        "assert os.getuid() == 65534 and os.getgid() == 65534, os.getuid()\n"
        "assert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR'], sorted(os.environ)\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "assert pids == [1, os.getpid()], pids\n"
        "assert not os.path.exists('/work') and not os.path.exists('/etc') and not os.path.exists({RUN!r})\n"
        "for path in ('/x', '/usr/x', '/dev/x', {PREFIX!r} + '/x'):\n"
        "    try:\n        open(path, 'w')\n        raise SystemExit('wrote ' + path)\n"
        "    except OSError:\n        pass\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "assert os.getcwd() == '/tmp' and open('/tmp/scratch.txt').read() == 'ok'\n"
        "print('{TOKEN}')\n")
    result = attempt("bubblewrap", program.replace("{PREFIX!r}", repr(sys.base_prefix)), scene)
    assert result["escaped"], result["status"]  # here "escaped" means: every assertion held
