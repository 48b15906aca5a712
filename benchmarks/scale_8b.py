"""The Llama-3-8B shape: memory budget per method, and the same training step measured.

For LoRA, LoRI-D and LoRI-S (rank 32 on all seven projections, batch 4 x 512 tokens) it prints:

1. the analytic budget of the real shape (config only, nothing allocated): bf16 weights, the
   adapter's own tensors (fp32: A, B_frozen, the trainable part, LoRI-S's index), trainable
   parameters, their gradients, AdamW state (2 x fp32 per trainable parameter), and activations
   with and without gradient checkpointing, estimated per transformer block as
   ``34 * s * b * h`` bytes (Korthikanti et al. 2022, 16-bit activations, attention scores not
   stored: SDPA / flash attention) and ``2 * s * b * h`` bytes per block input with checkpointing
   (plus one block recomputed at a time). It is an estimate: SwiGLU's 3.5 h intermediate and GQA
   shift the constant; a GPU run below measures.
2. measured, in one run, per method on the same model and batch: seconds per optimizer step
   (forward + backward + AdamW), tokens per second, optimizer-state bytes, and on a GPU the peak
   memory; with ratios to LoRA. On a CPU the model is the scaled-down shape (``--shape small``,
   random weights) so the code path is proven; ``--shape 8b`` needs a GPU with ~40 GB.

    python benchmarks/scale_8b.py                    # budget of the 8B shape + the small shape measured
    python benchmarks/scale_8b.py --shape 8b --checkpointing --steps 5   # on a GPU: the real shape (bf16)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
SMALL = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "lori-d", "lori-s"]
GB = 1e9


def projections(cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of the seven projections of one block."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def base_params(cfg: dict) -> int:
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    block = sum(a * b for a, b in projections(cfg)) + 2 * h  # + two RMSNorm weights
    return layers * block + 2 * vocab * h + h  # untied embedding and LM head, final norm


def budget(cfg: dict, method: str, rank: int, density: float, batch: int, seq: int) -> dict:
    """Bytes of each part of training memory (module doc)."""
    mods = [m for _ in range(cfg["num_hidden_layers"]) for m in projections(cfg)]
    a = sum(rank * i for i, _ in mods)
    b = sum(o * rank for _, o in mods)
    trainable = {"lora": a + b, "lori-d": b, "lori-s": int(density * b)}[method]
    # fp32 adapter tensors: A and B_frozen always; the trainable part: a dense delta (out x r) for lora /
    # lori-d, or the mask entries' values plus their int64 index for lori-s
    part = 4 * b if method != "lori-s" else 12 * trainable
    adapter = 4 * a + 4 * b + part
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    sbh = seq * batch * h
    return {"weights_bf16": 2 * base_params(cfg), "adapter_tensors": adapter, "trainable_params": trainable,
            "gradients": 4 * trainable, "adamw_state": 8 * trainable,
            "activations": 34 * sbh * layers, "activations_checkpointed": 2 * sbh * layers + 34 * sbh}


def print_budget(cfg: dict, rank: int, density: float, batch: int, seq: int) -> None:
    print(f"analytic budget, Llama-3-8B shape ({base_params(cfg) / 1e9:.2f}B parameters), rank {rank}, "
          f"7 projections, batch {batch} x {seq}, lori-s density {density:g}:")
    rows = {m: budget(cfg, m, rank, density, batch, seq) for m in METHODS}
    keys = list(rows["lora"])
    print(f"  {'':<32}" + "".join(f"{m:>14}" for m in METHODS))
    for k in keys:
        if k == "trainable_params":
            print(f"  {k:<32}" + "".join(f"{rows[m][k] / 1e6:>13.1f}M" for m in METHODS))
        else:
            print(f"  {k + ' (GB)':<32}" + "".join(f"{rows[m][k] / GB:>14.3f}" for m in METHODS))
    for ckpt in (False, True):
        act = "activations_checkpointed" if ckpt else "activations"
        tot = {m: sum(v for k, v in rows[m].items() if k not in ("trainable_params", "activations",
                                                                 "activations_checkpointed")) + rows[m][act]
               for m in METHODS}
        print(f"  {'total, ' + ('checkpointing' if ckpt else 'no checkpointing') + ' (GB)':<32}"
              + "".join(f"{tot[m] / GB:>14.2f}" for m in METHODS))


def measure(cfg: dict, method: str, rank: int, density: float, batch: int, seq: int, steps: int, device: str,
            dtype: torch.dtype, checkpointing: bool = False) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safecl.adapters import inject_adapters, trainable_parameters

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built where it runs, in its dtype: no 32 GB fp32 copy of 8B on the host
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = inject_adapters(model, TARGETS, rank, 2 * rank, seed=0, train_A=method == "lora")
    model.to(device)
    for layer in layers.values():
        if method == "lori-s":  # a mask of `density` of B at random (what calibration would pick)
            gen = torch.Generator().manual_seed(hash(layer.name) % 2**31)
            layer.begin_sparse(torch.rand(layer.B_frozen.shape, generator=gen) < density)
        else:
            layer.begin_dense()
    params = trainable_parameters(layers)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, kernels)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    sec = sum(times) / len(times)
    return {"method": method, "checkpointing": checkpointing, "trainable": sum(p.numel() for p in params), "tensors": len(params), "step_s": sec,
            "tokens_per_s": batch * seq / sec, "optimizer_state_bytes": state,
            "peak_gb": torch.cuda.max_memory_allocated() / GB if device == "cuda" else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["small", "8b"], default="small", help="the shape measured")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="also measure with gradient checkpointing")
    ap.add_argument("--json", help="write the measured rows (and the device) to this file")
    args = ap.parse_args(argv)
    print_budget(LLAMA3_8B, args.rank, args.density, args.batch, args.seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "8b" and device != "cuda":
        print("--shape 8b needs a GPU; measuring the small shape instead")
        args.shape = "small"
    cfg = LLAMA3_8B if args.shape == "8b" else SMALL
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\nmeasured on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{args.shape} shape, {dtype}, {args.steps} steps after one warm-up:")
    rows = []
    for ckpt in ([False, True] if args.checkpointing else [False]):
        group = [measure(cfg, m, args.rank, args.density, args.batch, args.seq, args.steps, device, dtype, ckpt)
                 for m in METHODS]
        print_rows(group, ckpt)
        rows += group
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "shape": args.shape,
                       "dtype": str(dtype), "torch": torch.__version__, "rank": args.rank, "density": args.density,
                       "batch": args.batch, "seq": args.seq, "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


def print_rows(rows: list[dict], checkpointing: bool) -> None:
    ref = rows[0]
    print(f"  gradient checkpointing {'on' if checkpointing else 'off'}:")
    print(f"  {'method':<8} {'trainable':>12} {'s/step':>8} {'tokens/s':>9} {'optim MB':>9} {'peak GB':>8}   "
          "ratios to lora (step time, optimizer state, peak memory)")
    for r in rows:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        peak_ratio = "" if r["peak_gb"] is None else f", {r['peak_gb'] / ref['peak_gb']:.3f}"
        print(f"  {r['method']:<8} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['optimizer_state_bytes'] / 2**20:>9.2f} {peak:>8}   {r['step_s'] / ref['step_s']:.2f}, "
              f"{r['optimizer_state_bytes'] / ref['optimizer_state_bytes']:.3f}{peak_ratio}")


if __name__ == "__main__":
    sys.exit(main())
