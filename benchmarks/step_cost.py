"""What a training step costs, as ratios to the frozen-base floor, measured in one run.

    python benchmarks/step_cost.py                                  # the real recipe's task stage (~6 min)
    python benchmarks/step_cost.py --model builtin:tiny-llama --rounds 3 --anchors 8   # quick check

Configurations, each on its own copy of the same base model, stepped in turn on the same
batches (the real recipe's GSM8K stage: batch 4 of GSM8K train rows, at most 256 tokens),
the order rotated every round so that other load hits them alike; medians of ``--rounds``
rounds after ``--warmup``:

- ``floor``: the frozen base model's forward and backward to the inputs (the input embeddings
  require a gradient, no parameter does): what any adapter method pays at least, since the
  gradient must flow through every layer;
- ``peft-lora``: PEFT's LoRA (same rank, alpha and targets), AdamW over its parameters;
- ``lora``, ``lori-d``, ``lori-s``: safecl's layers (lori-s on a random mask of the recipe's
  density: the count, not the choice, sets the cost);
- ``lori-s+kl``: lori-s plus the KL refusal anchor as the recipe sets it (64 anchors of the
  safety stage's prompts, 16 answer tokens, 4 per step) with the teacher cache;
- ``lori-s+kl-every4``: the same, taken every 4th step with weight x4 (``anchor.every: 4``);
- ``lori-s+kl-recomputed``: the same anchor with the teacher recomputed every step
  (``anchor.cache_mb: 0``);
- ``lori-s+kl-before``: the anchor as it was before the cache (teacher and student logits over
  every position of the batch, teacher recomputed every step).

The teacher cache is built once before the rounds (its time is printed, not in the steps).
Every step is as the loop runs it: the anchor term's forward and backward, the task loss
(output layer at the response positions only), clipping, AdamW. Printed: each median step
and its ratio to the floor, the anchor's extra time over a lori-s step, and the teacher
cache's one-off build time and size. Results go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/step_cost.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safecl.adapters import inject_adapters, stage_switched_off, trainable_parameters
from safecl.adapters.masks import mask_size, total_entries
from safecl.data.formatting import IGNORE, collate, encode_all
from safecl.data.sources import load_examples
from safecl.logits import labelled_logits, labelled_targets
from safecl.models import load_model_and_tokenizer
from safecl.recipe.loader import load_recipe, recipe_dir
from safecl.safety.anchors import KLAnchor, anchor_kl, encode_anchor, step_batch
from safecl.training.allocator import tune_for_cpu_training
from safecl.training.loop import response_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-saferpaca-gsm8k.yaml"
CONFIGS = ("floor", "peft-lora", "lora", "lori-d", "lori-s", "lori-s+kl", "lori-s+kl-every4", "lori-s+kl-recomputed",
           "lori-s+kl-before")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe whose stage 1 (data, anchor) is measured")
    p.add_argument("--model", default=None, help="override the recipe's model (builtin:tiny-llama: quick check)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--anchors", type=int, default=None, help="anchor prompts (default: the recipe's limit)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default="benchmarks/results/step_cost.json")
    return p.parse_args(argv)


class OldKLAnchor(KLAnchor):
    """The KL anchor before the teacher cache: full logits for teacher and student, every step."""

    def __call__(self, model, step: int) -> torch.Tensor:
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in collate(step_batch(self.anchors, self.batch_size, self.seed, step),
                                                  self.pad_id).items()}
        with torch.no_grad(), stage_switched_off(self.layers):
            teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.weight * anchor_kl(student, teacher, batch["labels"])


def floor_step(model, batch) -> None:
    """Forward and backward of the frozen model to its input embeddings (no parameter gradient)."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), labelled_targets(batch["labels"]), reduction="sum")
    (loss / max(1, int(keep.sum()))).backward()


def setup(name: str, base, recipe, anchors, pad: int, seed: int) -> dict:
    a = recipe.adapter
    model = copy.deepcopy(base)
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return {"model": model, "params": [], "opt": None, "terms": []}
    if name == "peft-lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=list(a.target_modules),
                                                 lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        method = "lori-s" if name.startswith("lori-s") else name
        layers = inject_adapters(model, a.target_modules, a.rank, a.alpha, seed, train_A=method == "lora")
        shapes = {n: tuple(l.B_frozen.shape) for n, l in layers.items()}
        if method == "lori-s":
            gen = torch.Generator().manual_seed(seed)
            total = total_entries(shapes)
            chosen = torch.zeros(total, dtype=torch.bool)
            chosen[torch.randperm(total, generator=gen)[:mask_size(a.density, total)]] = True
            off = 0
            for n in sorted(shapes):
                size = shapes[n][0] * shapes[n][1]
                layers[n].begin_sparse(chosen[off:off + size].view(shapes[n]))
                off += size
        else:
            for layer in layers.values():
                layer.begin_dense()
        params = trainable_parameters(layers)
        model._bench_layers = layers
    terms = []
    anchor = recipe.stages[1].anchor
    if name.startswith("lori-s+kl"):
        cls = OldKLAnchor if name.endswith("before") else KLAnchor
        cache = 0 if name.endswith(("recomputed", "before")) else anchor.cache_mb
        terms.append(cls("anchor_kl", model._bench_layers, anchors, anchor.weight, anchor.batch_size, pad, seed + 3,
                         cache_mb=cache, every=4 if name.endswith("every4") else 1))
        terms[-1]._decide(model)  # the once-per-stage cache is built here, outside the timed steps (reported)
    model.train()
    return {"model": model, "params": params, "opt": torch.optim.AdamW(params, lr=1e-4), "terms": terms}


def step(s: dict, batch: dict, index: int) -> tuple[float, float]:
    """(step seconds, of which the anchor term's seconds)."""
    t0 = time.perf_counter()
    if s["opt"] is None:
        floor_step(s["model"], batch)
        return time.perf_counter() - t0, 0.0
    term_s = 0.0
    for term in s["terms"]:
        t1 = time.perf_counter()
        value = term(s["model"], index)
        if value is not None:  # every N: skipped steps cost nothing
            value.backward()
        term_s += time.perf_counter() - t1
    loss_sum, n = response_loss(s["model"], batch)
    (loss_sum / max(1, n)).backward()
    torch.nn.utils.clip_grad_norm_(s["params"], 1.0)
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)
    return time.perf_counter() - t0, term_s


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_for_cpu_training()  # as `safecl train` does on the CPU (safecl/training/allocator.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.name={args.model}"] if args.model else []
    recipe = load_recipe(args.recipe, overrides)
    base_dir = recipe_dir(args.recipe)
    task, safety, anchor_cfg = recipe.stages[1], recipe.stages[0], recipe.stages[1].anchor
    if anchor_cfg is None:
        raise SystemExit(f"{args.recipe}: stage 1 has no anchor to measure")
    base, tok = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    settings = recipe.stage_settings(1)
    examples, _ = load_examples(task.data, base_dir, seed=recipe.seed)
    encoded, _ = encode_all(tok, examples, settings.max_seq_len)
    rng = random.Random(recipe.seed)
    rounds = args.warmup + args.rounds
    batches = [collate(rng.sample(encoded, settings.batch_size), tok.pad_token_id) for _ in range(rounds)]
    rows, _ = load_examples(safety.data, base_dir, seed=recipe.seed + 1)
    n_anchors = args.anchors or anchor_cfg.limit
    anchors = [a for a in (encode_anchor(tok, ex.prompt_messages, ex.response, anchor_cfg.tokens)
                           for ex in rows[:n_anchors]) if a is not None]
    setups = {name: setup(name, base, recipe, anchors, tok.pad_token_id, recipe.seed) for name in args.configs}
    del base
    times = {n: [] for n in args.configs}
    term_times = {n: [] for n in args.configs}
    first_call = {}
    print(f"[step_cost] {recipe.model.name}: batch {settings.batch_size} x <= {settings.max_seq_len} tokens, "
          f"{len(anchors)} anchors x {anchor_cfg.tokens} tokens, {anchor_cfg.batch_size} per step; "
          f"{torch.get_num_threads()} threads; {args.warmup} warmup + {args.rounds} rounds", flush=True)
    for r in range(rounds):
        k = r % len(args.configs)
        order = args.configs[k:] + args.configs[:k]
        line = {}
        for name in order:
            seconds, term_s = step(setups[name], batches[r], r + 1)
            line[name] = seconds
            if r == 0:
                first_call[name] = seconds
            if r >= args.warmup:
                times[name].append(seconds)
                term_times[name].append(term_s)
        print(f"  round {r + 1}/{rounds}{' (warmup)' if r < args.warmup else ''}: "
              + "  ".join(f"{n} {line[n]:.2f}s" for n in args.configs), flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"configs": {}, "model": recipe.model.name, "batch": settings.batch_size,
           "max_seq_len": settings.max_seq_len, "anchors": len(anchors), "anchor_tokens": anchor_cfg.tokens,
           "anchor_batch": anchor_cfg.batch_size, "rounds": args.rounds, "warmup": args.warmup,
           "threads": torch.get_num_threads(), "cpu": _cpu(), "torch": torch.__version__,
           "command": "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for n in args.configs:
        c = {"step_median_s": med[n], "step_seconds": times[n], "term_median_s": statistics.median(term_times[n])}
        if "floor" in med:
            c["vs_floor"] = med[n] / med["floor"]
            c["vs_floor_paired_median"] = statistics.median(t / f for t, f in zip(times[n], times["floor"]))
        res["configs"][n] = c
    for n in args.configs:
        if n.startswith("lori-s+kl") and "lori-s" in med:
            # mean, not median, of the paired differences: a term taken every 4th step costs its mean
            extra = statistics.mean(t - b for t, b in zip(times[n], times["lori-s"]))
            res["configs"][n]["anchor_extra_s"] = extra
            res["configs"][n]["anchor_extra_vs_lori_s"] = extra / med["lori-s"]
    cached = setups.get("lori-s+kl")
    if cached is not None:
        res["teacher_cache"] = cached["terms"][0].info
    print(f"\n{'configuration':<22} {'median step':>11} {'x floor':>8} {'anchor extra / lori-s step':>27}")
    for n in args.configs:
        c = res["configs"][n]
        vs = f"{c['vs_floor']:.3f}" if "vs_floor" in c else "-"
        extra = f"{c['anchor_extra_s']:.3f} s = {c['anchor_extra_vs_lori_s']:.3f}" if "anchor_extra_s" in c else ""
        print(f"{n:<22} {c['step_median_s']:>10.3f}s {vs:>8} {extra:>27}")
    if cached is not None:
        info = res["teacher_cache"]
        print(f"teacher cache: {info.get('cache_mb_needed')} MB, built once in {info.get('cache_seconds')} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written: {out}")
    return 0


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or f"{os.cpu_count()} cpus"


if __name__ == "__main__":
    raise SystemExit(main())
