"""Fault drill: signal a real ``safecl train`` at many moments, then run the next command.

For each moment and signal (SIGINT = Ctrl-C, SIGKILL), the script starts the smoke recipe (cut
to seconds), sends the signal at that moment, then runs ``--resume`` until the run completes,
and compares every stage's mask and adapter with an uninterrupted run's, bit for bit. Moments
are timed from events the script watches on disk (``mlflow.db`` appearing, a stage's checkpoint,
its commit), plus fixed offsets from the start. It prints one row per drill and fails (exit 1)
on any traceback, any resume that does not finish, or any difference.

    python benchmarks/fault_drill.py                 # 15 moments x SIGINT and SIGKILL (~15 min on 2 cores)
    python benchmarks/fault_drill.py --moments 4     # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smoke.yaml"
FAST = ["train.max_steps=8", "train.checkpoint_every=2", "retention.harmful.limit=4", "retention.benign.limit=4",
        "retention.max_new_tokens=4", "stages.1.eval.limit=4", "stages.2.eval.limit=4"]
# (event to wait for, seconds after it)
MOMENTS = [("start", 1.0), ("start", 3.0), ("mlflow.db", 0.0), ("mlflow.db", 0.2), ("mlflow.db", 0.4),
           ("mlflow.db", 0.6), ("mlflow.db", 0.8), ("run.json", 0.0), ("retention.json", 0.0),
           ("stages/00-safety/checkpoint", 0.0), ("stages/00-safety/adapter", 0.0),
           ("stages/01-arithmetic/checkpoint", 0.05), ("stages/01-arithmetic/metrics.json", 0.0),
           ("stages/02-sentiment/adapter", 0.0), ("stages/02-sentiment/metrics.json", 0.1)]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safecl", "train", str(RECIPE), f"output_dir={out}", *FAST, *extra]


def tensors(out: Path) -> dict:
    got = {}
    for d in sorted((out / "stages").iterdir()):
        for rel in ("mask.safetensors", "adapter/adapter_model.safetensors"):
            if (d / rel).is_file():
                got[f"{d.name}/{rel}"] = load_file(d / rel)
    return got


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a)


def drill(out: Path, event: str, delay: float, sig: int) -> tuple[str, int, str]:
    # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the run the default disposition, as a terminal would
    proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = time.monotonic()
    target = None if event == "start" else out / event
    while proc.poll() is None and target is not None and not target.exists():
        time.sleep(0.005)
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < delay:
        time.sleep(0.005)
    when = time.monotonic() - start
    if proc.poll() is not None:
        return f"finished before the signal ({when:.1f}s)", 0, proc.stderr.read()
    proc.send_signal(sig)
    err = proc.communicate()[1]
    runs = 0
    for _ in range(3):  # --resume, or what the last message names
        runs += 1
        nxt = subprocess.run(command(out, "--resume"), cwd=ROOT, capture_output=True, text=True)
        err += nxt.stderr
        if nxt.returncode == 0:
            return f"signal at {when:.1f}s, rc {proc.returncode}; resumed", runs, err
    return f"signal at {when:.1f}s; resume failed: {nxt.stderr.strip().splitlines()[-1:]}", -1, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moments", type=int, default=len(MOMENTS), help="how many of the moments to drill")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="safecl-drill-"))
    try:
        ref = work / "ref"
        subprocess.run(command(ref), cwd=ROOT, check=True, capture_output=True)
        expected = tensors(ref)
        failures = 0
        print(f"{'moment':<42} {'signal':<8} result")
        for i, (event, delay) in enumerate(MOMENTS[: args.moments]):
            for sig in (signal.SIGINT, signal.SIGKILL):
                out = work / f"d{i}-{sig.name}"
                note, runs, err = drill(out, event, delay, sig)
                ok = runs >= 0 and "Traceback" not in err and same(tensors(out), expected)
                failures += not ok
                print(f"{event + f' +{delay}s':<42} {sig.name:<8} {'ok' if ok else 'FAIL'}: {note}", flush=True)
                if not ok:
                    print("    " + err.strip().replace("\n", "\n    ")[-1500:])
        print(f"{failures} failure(s)")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
