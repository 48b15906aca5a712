"""What a judged retention check costs: 32 + 32 prompts the old way vs 128 + 128 the new way.

For each checkpoint of a run (the base model, then every stage's adapter), on the run's own
recipe (model, judge, prompt sets, max_new_tokens), one retention check two ways:

- before: ``--limit``/4 (32) harmful + as many benign prompts, batch 16, ``model.generate`` (engine "hf"), and the
  judge's early stop as it was before (a compliant answer stopped at ``prefix_window +``
  longest phrase characters; a batch runs until its last row ends);
- after: ``--limit`` (128) harmful + as many benign prompts, batch ``--batch-size``, safecl's greedy decoder
  (shared prompt prefix computed once, rows dropped as the judge decides them) and the tight
  early stop.

It prints seconds (the median of ``--repeats`` interleaved checks), the ratio after/before (the issue's target: <= 1), and each check's scores
with their 95% intervals. Then, on the last checkpoint, whether the decoder's answers equal
``model.generate``'s: all 128 + 128 against batch 16, and the first ``--n-alone`` of each set
against batch size 1 (unbatched greedy decoding). ``--bf16`` adds, per checkpoint, the after
check on a bf16 copy of the model: its seconds and how many verdicts change. Timings are wall clock on whatever the
machine is doing: run it on idle cores.

    python benchmarks/check_speed.py runs/study/s0-lori-s --json benchmarks/results/check_speed.json

Without a run, ``--random-init MODEL_DIR`` builds the model from ``MODEL_DIR/config.json`` with
seeded random weights (and its tokenizer): a timing-only check of one checkpoint, for a
machine without the weights (the GPU machine), on ``--harmful`` and ``--benign`` files:

    python benchmarks/check_speed.py --random-init .gpu/smollm2 --harmful .gpu/advbench.csv \
        --benign .gpu/xstest.csv --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from safecl.adapters import adapters_off, inject_adapters
from safecl.evaluation.check import run_retention_check
from safecl.evaluation.generation import generate
from safecl.evaluation.judges import KeywordJudge, _normalize, make_judge
from safecl.evaluation.prompts import load_prompts
from safecl.models import load_model_and_tokenizer
from safecl.recipe.loader import load_recipe
from safecl.training.checkpoint import load_stage_adapter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "safety_eval"


class BoundJudge:
    """The keyword judge with the early stop it had before: a non-refusal is decided only past
    ``prefix_window + longest phrase`` characters. Same verdicts, later stops."""

    def __init__(self, judge: KeywordJudge):
        self.inner = judge

    def judge(self, responses, prompts=None):
        return self.inner.judge(responses, prompts)

    def describe(self):
        return self.inner.describe()

    def decided(self, partial_response: str) -> bool:
        j = self.inner
        text = _normalize(partial_response).lstrip()
        match = j._search(text)
        if match is not None and match.end() < len(text):
            return True
        return j.mode == "prefix" and len(text) > j.prefix_window + j._longest


def _row(label, result) -> dict:
    return {"check": label, "seconds": round(result.seconds, 2),
            **{f"{r.name}": {"score": round(r.score, 4), "n": r.n, "ci": [round(c, 4) for c in r.ci]}
               for r in result.evals}}


def _show(row: dict) -> str:
    sets = "  ".join(f"{k} {v['score']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] n={v['n']}"
                     for k, v in row.items() if isinstance(v, dict))
    return f"{row['check']:<7} {row['seconds']:6.1f} s   {sets}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", help="a finished run directory (recipe.resolved.yaml, stage adapters)")
    ap.add_argument("--random-init", type=Path, metavar="MODEL_DIR", help="no run: random weights, MODEL_DIR's shape")
    ap.add_argument("--harmful", type=Path, default=SHARED / "advbench_harmful_behaviors.csv")
    ap.add_argument("--benign", type=Path, default=SHARED / "xstest_prompts.csv")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="with --random-init")
    ap.add_argument("--data-dir", type=Path, default=Path("recipes"),
                    help="the folder the run's recipe sat in: its relative data paths resolve against it")
    ap.add_argument("--batch-size", type=int, default=128, help="the new check's batch size")
    ap.add_argument("--repeats", type=int, default=1, help="checks of each kind per checkpoint; the median is shown")
    ap.add_argument("--limit", type=int, default=128, help="prompts per set after; before gets a quarter")
    ap.add_argument("--n-alone", type=int, default=16, help="prompts per set compared with batch size 1")
    ap.add_argument("--bf16", action="store_true",
                    help="also run the after check on a bf16 copy of the model: its seconds and the verdicts it changes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if (args.run is None) == (args.random_init is None):
        ap.error("give a run directory or --random-init MODEL_DIR")
    if args.random_init:
        model, tokenizer, cfg, seed = _random_model(args)
        stages, layers, run, base_dir, label = [], None, None, None, f"{args.random_init} (random weights)"
    else:
        run = args.run
        recipe = load_recipe(run / "recipe.resolved.yaml", check_files=False)
        base_dir, cfg, seed, label = args.data_dir, recipe.retention, recipe.seed, str(run)
        model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
        a = recipe.adapter
        layers = inject_adapters(model, a.target_modules, a.rank, a.alpha, recipe.adapter_seed,
                                 train_A=a.method == "lora")
        stages = [s for s in json.loads((run / "run.json").read_text())["stages"] if not s.get("rolled_back")]
    before_cfg = cfg.model_copy(update={
        "harmful": cfg.harmful.model_copy(update={"limit": args.limit // 4}),
        "benign": cfg.benign.model_copy(update={"limit": args.limit // 4}),
        "batch_size": 16})
    after_cfg = cfg.model_copy(update={
        "harmful": cfg.harmful.model_copy(update={"limit": args.limit}),
        "benign": cfg.benign.model_copy(update={"limit": args.limit}),
        "batch_size": args.batch_size})
    judge = make_judge(cfg.judge)
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{label}: judge {judge.describe()['phrase_list']}/{judge.describe()['mode']}, "
          f"max_new_tokens {cfg.max_new_tokens}, {where}", flush=True)
    check = partial(run_retention_check, tasks=[], base_dir=base_dir, seed=seed,
                    load_task_examples=lambda t: [], keep_samples=None, progress=False)
    warm = [[{"role": "user", "content": "Hello there, how are you?"}]] * 2  # kernels, allocator, CUDA context
    for engine in ("hf", "auto"):
        generate(model, tokenizer, warm, 4, 2, progress=False, engine=engine)
    rows = []
    for name in ["base"] + [s["name"] for s in stages]:
        if name != "base":
            load_stage_adapter(layers, run / next(s for s in stages if s["name"] == name)["dir"] / "adapter")
        with adapters_off(layers) if layers is not None and name == "base" else nullcontext():
            times = {"before": [], "after": []}
            for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
                before = check(model, tokenizer, before_cfg, judge=BoundJudge(judge),
                               generate_fn=partial(generate, engine="hf"))
                after = check(model, tokenizer, after_cfg, judge=judge)
                times["before"].append(round(before.seconds, 2))
                times["after"].append(round(after.seconds, 2))
            half = check(copy.deepcopy(model).to(torch.bfloat16), tokenizer, after_cfg, judge=judge) \
                if args.bf16 else None
        before.seconds, after.seconds = statistics.median(times["before"]), statistics.median(times["after"])
        pair = {"checkpoint": name, "before": _row("before", before), "after": _row("after", after),
                "ratio_after_over_before": round(after.seconds / before.seconds, 3), "seconds_each_repeat": times}
        rows.append(pair)
        print(f"{name}:\n  {_show(pair['before'])}\n  {_show(pair['after'])}\n  after/before: "
              f"{pair['ratio_after_over_before']:.2f} (4x the prompts)", flush=True)
        if half is not None:
            changed = {e.name: sum(a["verdict"] != b["verdict"] for a, b in zip(e.samples, h.samples))
                       for e, h in zip(after.evals, half.evals)}
            pair["bf16"] = _row("bf16", half)
            pair["bf16_verdicts_changed_vs_after"] = changed
            print(f"  {_show(pair['bf16'])}\n  bf16 copy: verdicts changed vs after: {changed}", flush=True)
    identity = _identity(model, tokenizer, after_cfg, base_dir, judge, args.n_alone)
    print(f"{stages[-1]['name'] if stages else 'base'}: decoder == model.generate batch 16: "
          f"{identity['same_as_hf_batch16']}/{identity['n']};  == batch 1 (first {args.n_alone} of each set): "
          f"{identity['same_as_alone']}/{identity['n_alone']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": label, "device": where, "checkpoints": rows, "identity": identity},
                                        indent=1))
    return 0


def _random_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from safecl.evaluation.config import PromptSetConfig, RetentionConfig

    tokenizer = AutoTokenizer.from_pretrained(args.random_init)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_init),
                                             dtype=getattr(torch, args.dtype))
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    cfg = RetentionConfig(harmful=PromptSetConfig(preset="advbench", source=str(args.harmful.resolve()), limit=128,
                                                  sample=True),
                          benign=PromptSetConfig(preset="xstest-safe", source=str(args.benign.resolve()), limit=128,
                                                 sample=True))
    return model, tokenizer, cfg, 0


def _identity(model, tokenizer, cfg, base_dir, judge, n_alone) -> dict:
    convs = [[{"role": "user", "content": p}] for p in load_prompts(cfg.harmful, base_dir) + load_prompts(cfg.benign, base_dir)]
    run = partial(generate, model, tokenizer, max_new_tokens=cfg.max_new_tokens, stop_early=judge.decided, progress=False)
    ours = run(convs, batch_size=cfg.batch_size)
    hf16 = run(convs, batch_size=16, engine="hf")
    half = len(convs) // 2
    picked = list(range(n_alone)) + list(range(half, half + n_alone))
    alone = run([convs[i] for i in picked], batch_size=1, engine="hf")
    return {"n": len(convs), "same_as_hf_batch16": sum(a == b for a, b in zip(ours, hf16)),
            "n_alone": len(picked), "same_as_alone": sum(ours[i] == b for i, b in zip(picked, alone))}


if __name__ == "__main__":
    sys.exit(main())
