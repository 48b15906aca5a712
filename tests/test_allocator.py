"""Host allocator settings for CPU training (safecl/training/allocator.py): freed activation-sized
buffers are reused, not faulted in from the kernel again, and the switch turns it off."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import resource, sys, torch
from safecl.training.allocator import tune_for_cpu_training
applied = tune_for_cpu_training() if sys.argv[1] == "tune" else None
def step():  # buffers of 1-64 MB alive together, then freed: a training step's activations and logits
    xs = [torch.empty(n).fill_(1.0) for n in (1 << 18, 5 << 18, 20 << 18, 64 << 18, 3 << 18)]
    return sum(float(x[0]) for x in xs)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    import os

    applied, tuned = _faults("tune")
    _, default = _faults("default")
    assert applied == "True"
    assert default >= 5 * 16_384                # at least the 64 MB buffer's 4 KiB pages, fresh every step
    assert tuned <= default / 5                 # the same memory reused (measured: 0-16k against 97k)
    off, _ = _faults("tune", {**os.environ, "SAFECL_CPU_MALLOC": "0"})
    assert off == "False"
