"""The refusal probe of a run: its reference after the safety stage, its monitor in task stages.

The math of every kind is in :mod:`safecl.safety.probe`; here the recipe's ``retention.probe``
section becomes data and callables, built from what only this floor may import: the greedy
decoder and the keyword judge of :mod:`safecl.evaluation`.

Files. ``<safety stage dir>/refusal_probe.json`` holds the reference: ``kind``, ``n`` (probe
prompts), ``base``, ``safety`` and, per kind, ``layer`` (direction) or ``tokens``, ``prefixes``
(token ids of each prompt's post-safety answer opening), ``texts``, ``refused`` (the judge's
verdict on each full post-safety answer) and ``rows`` (the prompts scored: those judged
refusals, all when none was) for ``prefix``/``prefix-prob``; ``tokens`` for ``opening``. It is
written before the safety stage's commit, so its checksum is in the stage's run.json entry.
With ``keep_adapters`` the monitor keeps the cumulative adapter at every probed step in
``<task stage dir>/probe_adapters/step-NNNNNN/`` (single process only), the mid-stage
checkpoints ``benchmarks/probe_correlation.py`` reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from safecl.adapters.export import save_peft_adapter
from safecl.data.sources import load_examples
from safecl.evaluation.generation import generate
from safecl.evaluation.judges import KeywordJudge
from safecl.safety.config import probe_tracks_judge
from safecl.safety.direction import load_direction
from safecl.safety.probe import (PROBE_FILE, DirectionProbe, OpeningProbe, PrefixProbe, ProbeMonitor, adapter_fingerprint,
                                 load_reference, probe_retention, reference, save_reference)
from safecl.training.rundir import stage_dir

DIRECTION_FILE = "refusal_direction.safetensors"
KEPT_DIR = "probe_adapters"


def probe_prompts(ctx, base_dir: Path, harmful: list | None = None) -> list[list[dict]]:
    """The first ``retention.probe.limit`` of refusal_direction.harmful (``harmful``: already read)."""
    if harmful is None:
        harmful, _ = load_examples(ctx.recipe.refusal_direction.harmful, base_dir, seed=ctx.recipe.seed,
                                   need_response=False)
    return [e.prompt_messages for e in harmful[:ctx.recipe.retention.probe.limit]]


def phrase_judge(judge_cfg) -> KeywordJudge:
    """The run's keyword judge in prefix mode (its phrase list and window): what decides an opening."""
    return KeywordJudge(judge_cfg.phrases, mode="prefix", prefix_window=judge_cfg.prefix_window)


def greedy_openings(tokenizer, tokens: int, batch_size: int):
    """``decode(model, prompts)``: each prompt's greedy first ``tokens`` tokens, decoded (KV cache)."""
    def decode(model, prompts: list[list[dict]]) -> list[str]:
        return generate(getattr(model, "module", model), tokenizer, prompts, max_new_tokens=tokens,
                        batch_size=batch_size, progress=False)
    return decode


def record_prefixes(model, tokenizer, prompts: list[list[dict]], tokens: int, judge: KeywordJudge,
                    max_new_tokens: int, batch_size: int) -> dict:
    """Each prompt's greedy answer (``max_new_tokens``, the judged check's length), judged; its
    first ``tokens`` tokens are the prefix. {tokens, prefixes, texts, refused, rows, rows_are}."""
    answers = generate(model, tokenizer, prompts, max_new_tokens=max(tokens, max_new_tokens), batch_size=batch_size,
                       progress=False)
    prefixes = [tokenizer(a, add_special_tokens=False)["input_ids"][:tokens] for a in answers]
    refused = [v.refusal for v in judge.judge(answers)]
    rows = [i for i, (y, r) in enumerate(zip(prefixes, refused)) if y and r]
    rows = rows or [i for i, y in enumerate(prefixes) if y]
    if not rows:
        raise ValueError("the prefix probe found no answer to record: every probe prompt's post-safety answer is empty")
    return {"tokens": tokens, "prefixes": prefixes, "texts": [tokenizer.decode(y) for y in prefixes],
            "refused": refused, "rows": rows, "rows_are": "refusals" if any(refused[i] for i in rows) else "all"}


def make_probe(ctx, ref: dict, prompts: list[list[dict]], direction: dict | None = None, sdir: Path | None = None):
    """The probe object of ``ref["kind"]`` over ``prompts`` (the direction read from ``sdir`` when not given)."""
    cfg, kind = ctx.recipe.retention.probe, ref["kind"]
    if kind == "direction":
        direction = direction if direction is not None else load_direction(sdir / DIRECTION_FILE)
        layer = int(ref["layer"]) if "layer" in ref else int(direction["best_layer"])
        return DirectionProbe(ctx.tokenizer, prompts, layer, direction["direction"][layer], cfg.batch_size)
    if kind in ("prefix", "prefix-prob"):
        return PrefixProbe(ctx.tokenizer, [prompts[i] for i in ref["rows"]], [ref["prefixes"][i] for i in ref["rows"]],
                           reduce="logprob" if kind == "prefix" else "prob", batch_size=cfg.batch_size)
    judge = phrase_judge(ctx.recipe.retention.judge)
    return OpeningProbe(prompts, greedy_openings(ctx.tokenizer, ref["tokens"], cfg.batch_size),
                        lambda text: judge.judge_one(text).refusal)


def compute_probe_reference(ctx, base_dir: Path, sdir: Path, direction: dict | None = None,
                            harmful: list | None = None) -> dict | None:
    """Right after the safety stage (the model as it is now): what the probe's kind needs, s(base)
    and s(safety), saved in the safety stage's directory. None without retention.probe."""
    cfg = ctx.recipe.retention.probe
    if cfg is None:
        return None
    start = time.perf_counter()
    prompts = probe_prompts(ctx, base_dir, harmful)
    ref: dict = {"kind": cfg.kind, "n": len(prompts)}
    if cfg.kind == "direction":
        direction = direction if direction is not None else load_direction(sdir / DIRECTION_FILE)
        ref["layer"] = int(direction["best_layer"])
    elif cfg.kind in ("prefix", "prefix-prob"):
        r = ctx.recipe.retention
        ref.update(record_prefixes(ctx.model, ctx.tokenizer, prompts, cfg.tokens, phrase_judge(r.judge),
                                   r.max_new_tokens, cfg.batch_size))
    else:
        ref["tokens"] = cfg.tokens
    ref.update(reference(make_probe(ctx, ref, prompts, direction, sdir), ctx.model, ctx.layers))
    ref["seconds"] = round(time.perf_counter() - start, 3)
    # the post-safety adapter reads s(safety) by construction: the first task stage's step 0 needs no probe
    ctx.probe_carry = (adapter_fingerprint(ctx.layers), probe_retention(ref["safety"], ref))
    if ctx.main:
        save_reference(sdir / PROBE_FILE, ref)
    return ref


def probe_reference_outdated(ctx, base_dir: Path, sdir: Path) -> bool:
    """The probe is on and its reference is missing, of another kind or token count, or was
    measured on another number of prompts (``retention.probe`` may change at ``--resume``); call
    on the post-safety model."""
    cfg = ctx.recipe.retention.probe
    if cfg is None:
        return False
    path = sdir / PROBE_FILE
    if not path.is_file():
        return True
    ref = load_reference(path)
    return (ref["n"] != len(probe_prompts(ctx, base_dir)) or ref["kind"] != cfg.kind
            or (cfg.kind != "direction" and ref.get("tokens") != cfg.tokens))


def _keeper(ctx, index: int):
    """``keep(step)``: the cumulative adapter now, into the stage's probe_adapters/step-NNNNNN/."""
    a, stage = ctx.recipe.adapter, ctx.recipe.stages[index]
    where = stage_dir(ctx.out, index, stage.name) / KEPT_DIR

    def keep(step: int) -> None:
        if ctx.main and getattr(ctx.accelerator, "num_processes", 1) == 1:
            save_peft_adapter(ctx.layers, where / f"step-{step:06d}", rank=a.rank, alpha=a.alpha,
                              targets=a.target_modules, base_model=ctx.recipe.model.name, dropout=a.dropout,
                              extra={"stage": stage.name, "index": index, "method": a.method, "step": step})
    return keep


def build_monitor(ctx, index: int, base_dir: Path) -> ProbeMonitor | None:
    """The refusal probe of task stage ``index`` (with the gate's watch threshold), or None. Its
    role is ``visual aid`` when the kind is not measured to track the judged check."""
    cfg, gate = ctx.recipe.retention.probe, ctx.recipe.gate
    if cfg is None or index == 0:
        return None
    sdir = stage_dir(ctx.out, 0, ctx.recipe.stages[0].name)
    ref = load_reference(sdir / PROBE_FILE)
    probe = make_probe(ctx, ref, probe_prompts(ctx, base_dir), sdir=sdir)
    watch = gate.watch == "probe"
    return ProbeMonitor(probe, ctx.layers, ref, cfg.every, threshold=gate.min_probe_retention if watch else None,
                        action=gate.watch_action, role="early warning" if probe_tracks_judge(cfg.kind) else "visual aid",
                        keep=_keeper(ctx, index) if cfg.keep_adapters else None, start=ctx.probe_carry)


def record_probe(ctx, monitor: ProbeMonitor | None, metrics: dict, echo) -> dict | None:
    """After a task stage: its probe curve and cost into ``metrics["probe"]``; returns what the
    mid-stage gate did ({step, probe_retention, threshold, action, restored_step?}) or None."""
    if monitor is None:
        return None
    probe = monitor.summary(metrics["train"]["seconds"])
    metrics["probe"] = probe
    ctx.probe_carry = monitor.end
    last = probe["points"][-1][1] if probe["points"] else None
    share = probe["share_of_stage_time"]
    echo(f"[safecl] refusal probe ({probe['kind']}, {probe['role']}): {probe['probes']} probes, last "
         f"{last if last is None else f'{last:.2f}'}, {probe['seconds']:.1f}s"
         + (f" ({100 * share:.1f}% of the stage's training time)" if share else ""))
    fired = probe["fired"]
    if fired:
        where = f", rolled back to step {fired['restored_step']}" if fired["action"] == "rollback" else ""
        echo(f"[safecl] WATCH {fired['action'].upper()}: probe retention {fired['probe_retention']:.2f} < "
             f"{fired['threshold']:g} at step {fired['step']}{where}; the stage ends there")
    return fired
