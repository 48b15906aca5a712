"""``safecl check MODEL [--adapter DIR]``: the retention check on any model, with or without any
PEFT LoRA adapter (safecl's, a composed one, or another tool's).

It runs the same check as a safecl run does after every stage
(:func:`safecl.evaluation.check.run_retention_check`): refusal of harmful prompts, over-refusal
of benign ones and the task scores configured, each with n, a 95% bootstrap interval and how it
was measured (the judge's description). Prompt sets and tasks come from a recipe's
``retention`` section and its task stages' ``eval`` (``--recipe``, with ``KEY=VALUE``
overrides), or with no recipe from :class:`~safecl.evaluation.config.RetentionConfig`'s
defaults (the built-in harmful and benign sets, no tasks).

The model is loaded as a run loads it (:func:`safecl.models.load_model_and_tokenizer`; when
MODEL is the recipe's ``model.name`` the recipe's model section is used, so a ``builtin:``
tiny model gets the recipe's shape and seed). The adapter is read with
``peft.PeftModel.from_pretrained`` and kept wrapped (not merged), so a safecl adapter gives the
same numbers as the run's own check of the same weights. Before PEFT sees it, the adapter is
checked: a LoRA adapter (``peft_type: LORA``) in safetensors whose every ``lora_A``/``lora_B``
names a linear of this model with matching in/out features; anything else is a
:class:`~safecl.errors.SafeclError` (exit code 2) naming the module.

``--baseline`` checks the bare model too and reports safety retention against it:
``refusal(model + adapter) / refusal(model)`` (undefined when the bare model refuses nothing).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path

from safecl.errors import ModelError, SafeclError

HELP = "Run the retention check (refusal, over-refusal, task scores) on a model, with or without a LoRA adapter."
EPILOG = """\
MODEL: a Hugging Face model directory, a hub id, or builtin:smollm2-135m-instruct / builtin:tiny-llama.
ADAPTER: any PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), e.g.
a safecl stage's adapter/, a `safecl compose` output, or one trained with PEFT, TRL, axolotl.
Prompt sets: the recipe's retention section and its task stages' eval sets (--recipe, overrides
as KEY=VALUE after MODEL), else the built-in harmful-eval / benign-eval sets (32 each).

examples:
  safecl check builtin:smollm2-135m-instruct                                     bare model, default sets
  safecl check builtin:smollm2-135m-instruct --adapter runs/compose/sa --recipe recipes/quickstart.yaml
  safecl check ./my-model --adapter ./my-lora --recipe recipes/smollm2-saferpaca-gsm8k.yaml --baseline
  safecl check builtin:tiny-llama --adapter runs/smoke/stages/02-sentiment/adapter --recipe recipes/smoke.yaml \\
      retention.harmful.limit=4 --json
  safecl check MODEL --adapter DIR --report out/check                            + out/check/report.html

exit codes: 0 checked, 2 bad input (model, adapter, recipe, prompt sets).
"""

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


# -- inputs ----------------------------------------------------------------------------------

def model_config(model: str, recipe, dtype: str | None):
    """The ModelConfig to load MODEL with: the recipe's model section when it names MODEL."""
    from safecl.recipe.schema import ModelConfig

    if recipe is not None and recipe.model.name == model:
        cfg = recipe.model
        return cfg.model_copy(update={"dtype": dtype}) if dtype else cfg
    return ModelConfig(name=model, dtype=dtype or (recipe.model.dtype if recipe is not None else "float32"))


def check_model_source(model: str) -> None:
    """A clear error for a local model path that does not exist or is not a model directory."""
    if model.startswith("builtin:"):
        return
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"MODEL {model}: a file, not a model directory (config.json + weights) or hub id")
        if not (p / "config.json").is_file():
            raise ModelError(f"MODEL {model}: no config.json in this directory; not a Hugging Face model directory")
        return
    if model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model.endswith("/") \
            or "\\" in model:
        raise ModelError(f"MODEL {model}: no such directory (a local path; a hub id looks like org/name)")


def resolve_adapter(path: str | Path) -> Path:
    """An adapter directory: the path itself, a safecl stage dir's adapter/, or a run's last stage."""
    from safecl.adapters.merge import resolve_adapter_dir

    p = Path(path)
    if not p.exists():
        raise SafeclError(f"--adapter {p}: no such directory")
    if p.is_dir() and (p / "lori-compact.safetensors").is_file() and not (p / CONFIG).is_file():
        raise SafeclError(f"--adapter {p}: holds safecl's compact form, not a PEFT adapter; expand it first: "
                          f"safecl compact {p / 'lori-compact.safetensors'} --out ADAPTER_DIR")
    return resolve_adapter_dir(p)


def _features(module, fan_in_fan_out: bool) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module, None if it is not one."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    w = getattr(module, "weight", None)
    if w is not None and getattr(w, "dim", lambda: 0)() == 2:  # transformers' Conv1D stores (in, out)
        return (int(w.shape[0]), int(w.shape[1])) if fan_in_fan_out or type(module).__name__ == "Conv1D" \
            else (int(w.shape[1]), int(w.shape[0]))
    return None


def validate_adapter(adapter_dir: Path, model, model_name: str) -> dict:
    """Check that ``adapter_dir`` is a PEFT LoRA adapter that fits ``model``; returns its config.

    Raises SafeclError: not LoRA, no safetensors weights, or a lora_A/lora_B whose module is
    missing from the model or has other in/out features (an adapter for another base model)."""
    from safetensors import safe_open

    try:
        config = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SafeclError(f"--adapter {adapter_dir}: cannot read {CONFIG}: {exc}") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise SafeclError(f"--adapter {adapter_dir}: peft_type {kind!r} is not LORA; safecl check loads PEFT LoRA "
                          "adapters (adapter_config.json with peft_type LORA)")
    if not (adapter_dir / WEIGHTS).is_file():
        extra = " (adapter_model.bin is a pickle; safecl reads safetensors only)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise SafeclError(f"--adapter {adapter_dir}: no {WEIGHTS}{extra}")
    modules = dict(model.named_modules())
    fan = bool(config.get("fan_in_fan_out"))
    shapes: dict[str, dict[str, tuple]] = {}
    try:
        with safe_open(str(adapter_dir / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                for which in ("A", "B"):
                    if key.endswith(f".lora_{which}.weight"):
                        name = key[: -len(f".lora_{which}.weight")].removeprefix(PREFIX)
                        shapes.setdefault(name, {})[which] = tuple(f.get_slice(key).get_shape())
    except Exception as exc:  # a corrupt or truncated file  # noqa: BLE001
        raise SafeclError(f"--adapter {adapter_dir}: cannot read {WEIGHTS}: {exc}") from None
    if not shapes:
        raise SafeclError(f"--adapter {adapter_dir}: {WEIGHTS} holds no lora_A / lora_B weights")
    base = config.get("base_model_name_or_path")
    hint = " (an adapter for another base model?" + (f" it was made for {base!r})" if base and base != model_name
                                                     else ")")
    for name, ab in sorted(shapes.items()):
        if set(ab) != {"A", "B"}:
            raise SafeclError(f"--adapter {adapter_dir}: module {name} has only lora_{next(iter(ab))}")
        module = modules.get(name)
        feats = _features(module, fan) if module is not None else None
        if feats is None:
            raise SafeclError(f"--adapter {adapter_dir}: module {name} is not a linear layer of {model_name}{hint}")
        (r_a, a_in), (b_out, r_b) = ab["A"][:2], ab["B"][:2]
        if (a_in, b_out) != feats or r_a != r_b:
            raise SafeclError(f"--adapter {adapter_dir}: module {name} is {feats[1]}x{feats[0]} (out x in) in "
                              f"{model_name} but the adapter's B A is {b_out}x{a_in} (A {ab['A']}, B {ab['B']})"
                              f"{hint}")
    return config


def load_adapter(model, adapter_dir: Path):
    """``PeftModel.from_pretrained`` (kept wrapped, eval mode); PEFT's errors become SafeclError."""
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise SafeclError(f"--adapter {adapter_dir}: PEFT cannot load it on this model: "
                          f"{str(exc).splitlines()[0]}") from None
    wrapped.eval()
    return wrapped


# -- the check -------------------------------------------------------------------------------

def run_check(model: str, adapter: str | Path | None = None, recipe: str | Path | None = None,
              overrides: list[str] | tuple[str, ...] = (), baseline: bool = False, seed: int | None = None,
              dtype: str | None = None, keep_samples: int | None = 5, progress: bool | None = None,
              echo=print, answers: str | Path | None = None) -> dict:
    """Check MODEL (+ adapter); returns the JSON document ``safecl check --json`` prints.
    ``answers``: also write every prompt, answer and verdict of the (adapter's) check there, as
    JSONL rows of a run's answers file (for reading, ``--rejudge`` and labelling)."""
    import torch

    from safecl import __version__
    from safecl.data.sources import load_examples
    from safecl.evaluation.check import run_retention_check
    from safecl.evaluation.config import RetentionConfig
    from safecl.evaluation.judges import make_judge
    from safecl.models import load_model_and_tokenizer

    if overrides and recipe is None:
        raise SafeclError(f"overrides {' '.join(overrides)} need --recipe (they change a recipe's keys)")
    if baseline and adapter is None:
        raise SafeclError("--baseline compares the model with an adapter against the bare model: give --adapter")
    check_model_source(model)
    shown = keep_samples
    if answers is not None:
        keep_samples = None  # every answer for the file; the document keeps `shown`
    adapter_dir = resolve_adapter(adapter) if adapter is not None else None
    rec, base_dir = None, Path.cwd()
    if recipe is not None:
        from safecl.recipe import load_recipe
        from safecl.recipe.loader import recipe_dir

        rec = load_recipe(recipe, list(overrides), check_files=False)
        base_dir = recipe_dir(recipe)
    cfg = rec.retention if rec is not None else RetentionConfig()
    tasks = [(s.name, s.eval) for s in rec.stages if s.eval is not None] if rec is not None else []
    seed = seed if seed is not None else (rec.seed if rec is not None else 0)
    mcfg = model_config(model, rec, dtype)
    start = time.perf_counter()
    m, tokenizer = load_model_and_tokenizer(mcfg, seed=seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m.to(device)
    adapter_config = validate_adapter(adapter_dir, m, model) if adapter_dir is not None else None
    load_seconds = time.perf_counter() - start
    judge = make_judge(cfg.judge)
    examples: dict[str, list] = {}

    def load_task(task_cfg):
        key = task_cfg.model_dump_json()
        if key not in examples:
            examples[key], _ = load_examples(task_cfg, base_dir, seed=seed, need_response=False)
        return examples[key]

    def check(net, label):
        echo(f"[safecl] checking {label} ...")
        return run_retention_check(net, tokenizer, cfg, tasks, base_dir, seed, load_task, judge=judge,
                                   keep_samples=keep_samples, progress=progress)

    base_result = check(m, model) if baseline else None
    net = load_adapter(m, adapter_dir) if adapter_dir is not None else m
    result = check(net, f"{model} + {adapter_dir}" if adapter_dir is not None else model)
    if answers is not None:
        from safecl.evaluation.answers import write_answers

        write_answers(answers, result)
        echo(f"[safecl] every answer: {answers}")
    retention = None
    if base_result is not None:
        b = base_result["refusal"].score
        retention = result["refusal"].score / b if b > 0 else None
    notes = []
    made_for = (adapter_config or {}).get("base_model_name_or_path")
    if made_for and made_for != model:
        notes.append(f"the adapter was made for {made_for!r}; checked on {model!r} (its modules and shapes fit)")
    if rec is not None and not rec.retention.enabled:
        notes.append("the recipe has retention.enabled: false; its retention settings are used anyway")
    if base_result is not None and retention is None:
        notes.append("safety retention is undefined: the bare model refuses none of the harmful prompts")
    return {
        "safecl_version": __version__,
        "model": model,
        "model_config": mcfg.model_dump(mode="json"),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "adapter_base_model": adapter_config.get("base_model_name_or_path") if adapter_config else None,
        "adapter_rank": adapter_config.get("r") if adapter_config else None,
        "recipe": str(recipe) if recipe is not None else None,
        "overrides": list(overrides),
        "prompt_sets": "recipe" if rec is not None else "RetentionConfig defaults",
        "seed": seed,
        "device": str(device),
        "retention_config": cfg.model_dump(mode="json"),
        "judge": judge.describe(),
        "tasks": [name for name, _ in tasks],
        "check": result.to_dict(keep=shown),
        "baseline": base_result.to_dict(keep=shown) if base_result is not None else None,
        "safety_retention": retention,
        "load_seconds": load_seconds,
        "notes": notes,
    }


# -- output ----------------------------------------------------------------------------------

def _cell(e: dict | None) -> tuple[str, str, str]:
    if e is None:
        return "-", "-", "-"
    lo, hi = e["ci"]
    return f"{e['score']:.3f}", f"[{lo:.2f}, {hi:.2f}]", str(e["n"])


def judge_line(doc: dict) -> str:
    j = doc["judge"]
    cfg = doc["retention_config"]
    how = (f"keyword judge ({j['phrase_list']}, {j['n_phrases']} phrases, {j['mode']} mode)" if j["kind"] == "keyword"
           else f"classifier judge {j.get('model')}")
    sampling = "sampling" if cfg["do_sample"] else "greedy"
    return f"{how}; {sampling}, {cfg['max_new_tokens']} new tokens; seed {doc['seed']}; prompts: {doc['prompt_sets']}"


def result_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the score table: eval set, score, CI, n (and the bare model's)."""
    base = {e["name"]: e for e in (doc["baseline"] or {}).get("evals", [])}
    header = ["eval set", "score", "95% CI", "n", "empty"]
    if doc["baseline"] is not None:
        header += ["bare model", "95% CI", "n"]
    rows = []
    for e in doc["check"]["evals"]:
        row = [e["name"], *_cell(e), str(e["n_empty"])]
        if doc["baseline"] is not None:
            row += list(_cell(base.get(e["name"])))
        rows.append(row)
    return header, rows


def retention_line(doc: dict) -> str | None:
    if doc["baseline"] is None:
        return None
    base = next(e for e in doc["baseline"]["evals"] if e["name"] == "refusal")["score"]
    now = next(e for e in doc["check"]["evals"] if e["name"] == "refusal")["score"]
    ratio = doc["safety_retention"]
    return (f"safety retention = refusal(model + adapter) / refusal(bare model) = {now:.3f} / {base:.3f} = "
            + (f"{ratio:.2f}" if ratio is not None else "undefined (the bare model refuses nothing)"))


def format_check(doc: dict) -> str:
    header, rows = result_rows(doc)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    what = doc["model"] + (f" + adapter {doc['adapter']}" if doc["adapter"] else " (no adapter)")
    out = [f"[safecl] check: {what}", f"[safecl] {judge_line(doc)}", "  " + line(header),
           "  " + "  ".join("-" * w for w in widths), *("  " + line(r) for r in rows)]
    if retention_line(doc):
        out.append(f"[safecl] {retention_line(doc)}")
    out += [f"[safecl] note: {n}" for n in doc["notes"]]
    out.append(f"[safecl] refusal: harmful prompts refused (higher is safer); over_refusal: benign prompts refused "
               f"(lower is better); {doc['check']['seconds']:.1f}s")
    return "\n".join(out)


def write_check_report(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    """``report.html`` (self-contained, like the audit's) and ``check.json`` in ``out_dir``."""
    from safecl.atomic import write_json, write_text
    from safecl.audit.report import _CSS, html_table

    out = Path(out_dir)
    what = doc["model"] + (f" + {doc['adapter']}" if doc["adapter"] else "")
    title = f"safecl check: {what}"
    header, rows = result_rows(doc)
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p class='read'>{html.escape(judge_line(doc))}. Scores are shares of n prompts with 95% bootstrap "
         "intervals; refusal is the share of harmful prompts refused (higher is safer), over_refusal the share of "
         "benign prompts refused (lower is better).</p>",
         "<h2>Scores</h2>" + html_table(header, rows)]
    if retention_line(doc):
        h.append(f"<p><b>{html.escape(retention_line(doc))}</b></p>")
    for n in doc["notes"]:
        h.append(f"<p class='drifted'>note: {html.escape(n)}</p>")
    info = [["model", doc["model"]], ["adapter", doc["adapter"] or "-"],
            ["adapter made for", doc["adapter_base_model"] or "-"], ["recipe", doc["recipe"] or "-"],
            ["overrides", " ".join(doc["overrides"]) or "-"], ["seed", str(doc["seed"])], ["device", doc["device"]],
            ["safecl", doc["safecl_version"]]]
    h.append("<h2>What was checked</h2>" + html_table(["", ""], info))
    checked = "model + adapter" if doc["adapter"] else "model"
    for label, res in ((checked, doc["check"]), ("bare model", doc["baseline"])):
        if res is None:
            continue
        h.append(f"<h2>Samples: {html.escape(label)}</h2>")
        for e in res["evals"]:
            measured = json.dumps(e["measured_by"], sort_keys=True)
            h.append(f"<h3>{html.escape(e['name'])}</h3><p class='muted'>measured by {html.escape(measured)}</p>")
            samples = [[s.get("prompt", ""), s.get("response", ""), str(s.get("verdict")), str(s.get("answer", ""))]
                       for s in e["samples"]]
            h.append(html_table(["prompt", "response", "verdict", "answer"], samples) if samples
                     else "<p class='muted'>no samples kept</p>")
    h.append("</body></html>")
    paths = {"html": out / "report.html", "json": out / "check.json"}
    write_text(paths["html"], "\n".join(h))
    write_json(paths["json"], doc)
    return paths


# -- command line ----------------------------------------------------------------------------

def configure_check_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``safecl check``; sets :func:`cmd_check` as the handler."""
    p.description = p.description or HELP
    p.epilog = p.epilog or EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", metavar="MODEL", help="HF model directory, hub id, or builtin:<name>")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override keys of --recipe (e.g. retention.harmful.limit=8)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory (or a safecl stage/run directory)")
    p.add_argument("--recipe", metavar="RECIPE", help="take the prompt sets, judge, generation settings and tasks "
                   "from this recipe (retention section, task stages' eval); default: built-in sets, no tasks")
    p.add_argument("--baseline", action="store_true",
                   help="also check the bare model and print safety retention = refusal(adapter) / refusal(bare)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.html (self-contained) and DIR/check.json")
    p.add_argument("--answers", metavar="FILE", help="write every prompt, answer and verdict to FILE (JSONL, as a "
                   "run's answers.jsonl: `safecl audit` can read, re-judge and label it)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap / sampling seed and builtin:tiny-llama weights "
                   "(default: the recipe's seed, else 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: the recipe's model.dtype, else float32)")
    p.set_defaults(func=cmd_check)
    return p


def cmd_check(args) -> int:
    echo = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    doc = run_check(args.model, args.adapter, args.recipe, list(args.overrides), baseline=args.baseline,
                    seed=args.seed, dtype=args.dtype, progress=False if args.json else None, echo=echo,
                    answers=args.answers)
    if args.report:
        paths = write_check_report(doc, args.report)
        doc["report"] = {k: str(v) for k, v in paths.items()}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_check(doc))
        if args.report:
            print(f"[safecl] report: {doc['report']['html']}")
    return 0
