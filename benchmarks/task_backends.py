"""Cost and agreement of the task-eval backends on one model, on the same problems.

GSM8K test problems (the gsm8k preset over ../shared) scored on SmolLM2-135M-Instruct by

- safecl's ``exact_match`` (last number equals the answer; generation stops once "The answer is
  N" / "#### N" is written), and
- lm-evaluation-harness's ``gsm8k`` template (``metric: harness``; its own generation loop, no
  early stop, its regex filter and string exact match),

both greedy with the same token budget. Printed: seconds per backend (and per 64 problems), both
scores with 95% intervals, how often the two verdicts agree per problem, and how often the two
backends generated the same text (they format prompts through the same chat template; batching
and stopping differ). ``--humaneval`` adds pass@1 by execution on HumanEval (cost per 64).

    python benchmarks/task_backends.py --n 64 --max-new-tokens 160 [--humaneval]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from safecl.data.sources import load_examples
from safecl.evaluation.check import _task_set
from safecl.evaluation.config import RetentionConfig, TaskEvalConfig
from safecl.models import load_model_and_tokenizer
from safecl.recipe.schema import ModelConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"


def score(name: str, task: TaskEvalConfig, model, tokenizer, cfg: RetentionConfig) -> dict:
    examples, _ = load_examples(task, None, seed=0, need_response=False)
    ev = _task_set(name, task, examples, model, tokenizer, cfg, 0, None, False)
    per64 = ev.seconds / ev.n * 64
    print(f"  {name:<22} n={ev.n:<4} score {ev.score:.3f} [{ev.ci[0]:.3f}, {ev.ci[1]:.3f}]  {ev.seconds:7.1f} s  "
          f"({per64:.1f} s per 64)", flush=True)
    return {"name": name, "n": ev.n, "score": ev.score, "ci": list(ev.ci), "seconds": round(ev.seconds, 1),
            "seconds_per_64": round(per64, 1), "verdicts": [s["verdict"] for s in ev.samples],
            "responses": [s["response"] for s in ev.samples]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--humaneval", action="store_true")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="builtin:smollm2-135m-instruct"))
    cfg = RetentionConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    gsm8k = dict(preset="gsm8k", source=str(SHARED / "gsm8k" / "test.jsonl"), split="test", limit=args.n)
    print(f"GSM8K test, first {args.n} problems, SmolLM2-135M-Instruct, greedy, {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads:")
    builtin = score("safecl exact_match", TaskEvalConfig(**gsm8k, metric="exact_match"), model, tokenizer, cfg)
    harness = score("lm-eval gsm8k", TaskEvalConfig(**gsm8k, metric="harness", harness="gsm8k"), model, tokenizer, cfg)
    agree = sum(a == b for a, b in zip(builtin["verdicts"], harness["verdicts"])) / len(builtin["verdicts"])
    same = sum(a.strip() == b.strip() for a, b in zip(builtin["responses"], harness["responses"])) / args.n
    print(f"  verdicts agree on {agree:.3f} of the problems; identical responses on {same:.3f} "
          "(safecl stops at the final answer, the harness at its token budget)")
    out = {"n": args.n, "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
           "builtin": builtin, "harness": harness, "verdict_agreement": agree, "same_response": same}
    if args.humaneval:
        he = dict(preset="humaneval", source=str(SHARED / "humaneval" / "HumanEval.jsonl.gz"), split="test", limit=args.n,
                  metric="pass_at_k", allow_code_execution=True)
        out["humaneval"] = score("HumanEval pass@1", TaskEvalConfig(**he), model, tokenizer,
                                 RetentionConfig(max_new_tokens=256, batch_size=args.batch_size))
    for k in ("builtin", "harness", "humaneval"):
        if k in out:
            out[k] = {x: v for x, v in out[k].items() if x not in ("verdicts", "responses")}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
