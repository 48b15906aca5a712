"""What a judged check costs per prompt, and what changes it: batch size and early stop.

On SmolLM2-135M-Instruct, the first ``--n`` AdvBench behaviours (the advbench preset over
../shared), greedy, ``--max-new-tokens`` new tokens, keyword judge (safecl list, prefix mode):
seconds per prompt for each batch size, with the judge's early stop (generation ends once the
verdict cannot change) and without; whether every configuration produced the same verdicts as
the first; and how many tokens early stop left ungenerated (new tokens, summed).

    python benchmarks/check_speed.py --n 64 --max-new-tokens 32 --batch-sizes 16 32 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from safecl.evaluation.config import JudgeConfig, PromptSetConfig
from safecl.evaluation.generation import generate
from safecl.evaluation.judges import make_judge
from safecl.evaluation.prompts import load_prompts
from safecl.models import load_model_and_tokenizer
from safecl.recipe.schema import ModelConfig

ADVBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "safety_eval" / "advbench_harmful_behaviors.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    prompts = load_prompts(PromptSetConfig(preset="advbench", source=str(ADVBENCH), limit=args.n), None)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="builtin:smollm2-135m-instruct"))
    judge = make_judge(JudgeConfig())
    rows, first = [], None
    print(f"{len(prompts)} AdvBench prompts, greedy, {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads")
    for stop in (True, False):
        for bs in args.batch_sizes:
            t0 = time.perf_counter()
            out = generate(model, tokenizer, convs, args.max_new_tokens, bs, stop_early=judge.decided if stop else None,
                           progress=False)
            sec = time.perf_counter() - t0
            verdicts = [v.refusal for v in judge.judge(out, prompts)]
            first = first if first is not None else verdicts
            tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in out)
            rows.append({"early_stop": stop, "batch_size": bs, "seconds": round(sec, 2),
                         "seconds_per_prompt": round(sec / len(prompts), 3), "new_tokens": tokens,
                         "refusal": sum(verdicts) / len(verdicts), "same_verdicts_as_first": verdicts == first})
            print(f"  early stop {'on ' if stop else 'off'}  batch {bs:>3}: {sec:6.1f} s ({sec / len(prompts):.3f} s per "
                  f"prompt), {tokens} new tokens, refusal {sum(verdicts) / len(verdicts):.3f}, "
                  f"same verdicts: {verdicts == first}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
