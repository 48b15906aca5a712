"""The LoRI-S invariants on an accelerator: train the smoke recipe on the device accelerate picks
(a GPU where there is one) and on the CPU, check each run directory, and compare the two.

Checked on each run, from its files alone (k = stage index, M_k its B-mask, B^(k) the adapter
written after stage k, A^(k) its A):

- masks pairwise disjoint: M_j & M_k = 0 for j != k;
- A frozen and seeded: A^(k) == seeded_projection(seed, module, r, in), bit for bit, every k;
- earlier stages untouched: B^(k)[M_j] == B^(k-1)[M_j] bit for bit for every j < k;
- nothing outside the masks: B^(k) == 0 outside M_0 | ... | M_k.

Then the GPU run's final B against the CPU run's: mask agreement (Jaccard, per stage) and the
largest absolute difference of B on the entries both runs own (float order differs, so not 0).
``--fsdp`` adds two runs through safecl's FSDP2 path (torchrun, one process: nothing to shard
across, but the same fully_shard, lockstep generation and gradient all-reduce), in fp32 and with
bf16 base compute, each checked and compared with the plain device run.

    python benchmarks/gpu_check.py --out /tmp/gpu-check [--fsdp]   # prints JSON, exits 1 on a broken invariant
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from safecl.adapters.export import load_adapter_tensors, load_mask, module_name
from safecl.adapters.layer import seeded_projection


def train(out: Path, cpu: bool = False, fsdp: str | None = None) -> float:
    """One smoke run; ``fsdp`` ("no" or "bf16"): under torchrun with FSDP2 asked for, one process."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}))
    cmd = [sys.executable, "-m", "safecl"]
    if fsdp is not None:
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", ACCELERATE_MIXED_PRECISION=fsdp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "safecl"]
    start = time.perf_counter()
    subprocess.run([*cmd, "train", "recipes/smoke.yaml", "tracking.enabled=false", f"output_dir={out}"],
                   check=True, env=env)
    return time.perf_counter() - start


def stage_dirs(run: Path) -> list[Path]:
    return sorted(p for p in (run / "stages").iterdir() if p.is_dir())


def check_run(run: Path) -> list[str]:
    """The invariants of the module docstring; returns the broken ones (empty: all hold)."""
    cfg = json.loads((stage_dirs(run)[0] / "adapter" / "adapter_config.json").read_text())
    seed = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["seed"]
    rank = cfg["r"]
    errors, masks, prev = [], [], None
    for k, sdir in enumerate(stage_dirs(run)):
        tensors = load_adapter_tensors(sdir / "adapter")
        A = {module_name(n): t for n, t in tensors.items() if n.endswith("lora_A.weight")}
        B = {module_name(n): t for n, t in tensors.items() if n.endswith("lora_B.weight")}
        mask = load_mask(sdir / "mask.safetensors")
        for j, earlier in enumerate(masks):
            if any((mask[n] & earlier[n]).any() for n in mask):
                errors.append(f"stage {k}'s mask overlaps stage {j}'s")
        for n, a in A.items():
            if not torch.equal(a, seeded_projection(seed, n, rank, a.shape[1]).to(a.dtype)):
                errors.append(f"stage {k}: A of {n} is not the seeded projection")
                break
        if prev is not None:
            for j, earlier in enumerate(masks):
                if any(not torch.equal(B[n][earlier[n]], prev[n][earlier[n]]) for n in B):
                    errors.append(f"stage {k} changed entries of stage {j}")
        masks.append(mask)
        owned = {n: torch.stack([m[n] for m in masks]).any(0) for n in B}
        if any(B[n][~owned[n]].abs().max() > 0 for n in B if (~owned[n]).any()):
            errors.append(f"stage {k}: B is non-zero outside the stages' masks")
        prev = B
    return errors


def compare(gpu: Path, cpu: Path) -> dict:
    out = {}
    for a, b in zip(stage_dirs(gpu), stage_dirs(cpu)):
        ma, mb = load_mask(a / "mask.safetensors"), load_mask(b / "mask.safetensors")
        inter = sum(int((ma[n] & mb[n]).sum()) for n in ma)
        union = sum(int((ma[n] | mb[n]).sum()) for n in ma)
        Ba, Bb = load_adapter_tensors(a / "adapter"), load_adapter_tensors(b / "adapter")
        both = {module_name(n): ma[module_name(n)] & mb[module_name(n)] for n in Ba if n.endswith("lora_B.weight")}
        diffs = [(Ba[n][both[module_name(n)]] - Bb[n][both[module_name(n)]]).abs()
                 for n in Ba if n.endswith("lora_B.weight")]
        diff = max((float(d.max()) for d in diffs if d.numel()), default=0.0)
        scale = max(float(Bb[n].abs().max()) for n in Bb if n.endswith("lora_B.weight"))
        out[a.name] = {"mask_jaccard": round(inter / union, 4), "max_abs_diff_B": diff, "max_abs_B": scale}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu-check", help="directory for the two runs")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--fsdp", action="store_true", help="also train under FSDP2 (one process, fp32 and bf16) and "
                    "compare with the plain device run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no accelerator seen)"
    result = {"device": device, "torch": torch.__version__, "seconds": {}, "broken": {}}
    runs = [("device", False, None), ("cpu", True, None)]
    if args.fsdp:
        runs += [("device-fsdp2", False, "no"), ("device-fsdp2-bf16", False, "bf16")]
    for name, cpu, fsdp in runs:
        result["seconds"][name] = round(train(out / name, cpu, fsdp), 1)
        result["broken"][name] = check_run(out / name)
        result.setdefault("trained_on", {})[name] = json.loads((out / name / "run.json").read_text())["device"]
    if torch.cuda.is_available() and not result["trained_on"]["device"].startswith("cuda"):
        result["broken"]["device"].append(f"a GPU is visible but the run trained on {result['trained_on']['device']}")
    result["device_vs_cpu"] = compare(out / "device", out / "cpu")
    if args.fsdp:
        result["device_fsdp2_vs_device"] = compare(out / "device-fsdp2", out / "device")
        result["device_fsdp2_bf16_vs_device"] = compare(out / "device-fsdp2-bf16", out / "device")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ok = not any(result["broken"].values())
    print("invariants hold on every run" if ok else "BROKEN invariants: see 'broken'")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
