"""The safety-keeping mechanisms of a task stage, built for the runner and handed to the loop.

Nothing here trains: it turns a stage's ``replay`` / ``anchor`` / ``merge`` keys, the
adapter's ``allocation`` and the recipe's ``refusal_direction`` into plain data and callables
(:mod:`safecl.data.replay`, :mod:`safecl.safety`, :mod:`safecl.adapters.allocation`,
:mod:`safecl.adapters.conflict` hold the math), and records what each costs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from safecl.adapters.conflict import merge_conflicts
from safecl.data.replay import mix_replay
from safecl.data.formatting import user_text
from safecl.data.sources import load_examples
from safecl.evaluation.generation import generate
from safecl.recipe.schema import Recipe
from safecl.safety.anchors import DirectionAnchor, KLAnchor, encode_anchor, prompt_part
from safecl.safety.direction import load_direction, refusal_direction, save_direction
from safecl.safety.selection import nearest_count, nearest_scores, pick_anchors, top
from safecl.safety.sensitivity import safety_sensitivity
from safecl.training.probing import DIRECTION_FILE, compute_probe_reference
from safecl.training.rundir import stage_dir


def apply_replay(recipe: Recipe, index: int, examples: list, pools: dict, base_dir: Path) -> tuple[list, dict | None]:
    """The stage's training rows with replay rows mixed in (see safecl.data.replay)."""
    cfg = recipe.stages[index].replay
    if cfg is None:
        return examples, None
    if cfg.source is None:
        pool = pools[0]
    else:
        pool, _ = load_examples(cfg.source, base_dir, seed=recipe.seed + 7 * index)
    mixed, counts = mix_replay(examples, pool, cfg.share, seed=recipe.seed * 1000 + index)
    counts["source"] = "safety stage data" if cfg.source is None else cfg.source.source
    return mixed, counts


def check_sources(recipe: Recipe, base_dir: Path) -> None:
    """Read every anchor and refusal-direction source once before training, so a bad file
    fails the run at its start (naming file and row), not after the safety stage."""
    if recipe.refusal_direction is not None:
        for cfg in (recipe.refusal_direction.harmful, recipe.refusal_direction.harmless):
            load_examples(cfg, base_dir, seed=recipe.seed, need_response=False)
    for stage in recipe.stages:
        if stage.anchor is not None and stage.anchor.prompts is not None:
            load_examples(stage.anchor.prompts, base_dir, seed=recipe.seed + 1, need_response=False)


def _anchor_prompts(ctx, index: int, base_dir: Path, examples: list) -> tuple[list[list[dict]], dict]:
    """The stage's anchor prompts (see safecl.safety.selection) and what chose them."""
    recipe = ctx.recipe
    cfg = recipe.stages[index].anchor
    source = cfg.prompts if cfg is not None and cfg.prompts is not None else recipe.stages[0].data
    limit = cfg.limit if cfg is not None else 64
    pool, _ = load_examples(source, base_dir, seed=recipe.seed + 1, need_response=False)
    seed = recipe.seed * 1000 + index + 17
    if cfg is None or cfg.task_share == 0:
        return [pool[i].prompt_messages for i in pick_anchors(len(pool), limit, seed)], {}
    start = time.perf_counter()
    rng = random.Random(seed + 12)
    candidates = sorted(rng.sample(range(len(pool)), min(cfg.task_pool, len(pool))))
    own = [ex for ex in examples if not ex.meta.get("replay")]
    task = [own[i].prompt_messages for i in sorted(rng.sample(range(len(own)), min(64, len(own))))]
    scores = nearest_scores(ctx.model, ctx.tokenizer, [pool[i].prompt_messages for i in candidates], task)
    picks = pick_anchors(len(candidates), limit, seed, scores, cfg.task_share)
    near = top(scores, nearest_count(len(candidates), limit, cfg.task_share))
    info = {"selection": {"task_share": cfg.task_share, "candidates": len(candidates), "task_prompts": len(task),
                          "nearest": len(near), "seconds": round(time.perf_counter() - start, 3),
                          "nearest_examples": [user_text(pool[candidates[i]].prompt_messages)[:80]
                                               for i in near[:5]]}}
    return [pool[candidates[i]].prompt_messages for i in picks], info


def teacher_anchors(ctx, index: int, base_dir: Path, tokens: int, examples: list) -> tuple[list, dict]:
    """Anchor prompts with the model's own greedy first ``tokens`` tokens (call before the stage
    trains: the model is then the teacher)."""
    start = time.perf_counter()
    prompts, chosen = _anchor_prompts(ctx, index, base_dir, examples)
    responses = generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=tokens, batch_size=16, progress=False)
    anchors = [a for a in (encode_anchor(ctx.tokenizer, p, r, tokens) for p, r in zip(prompts, responses))
               if a is not None]
    return anchors, {"prompts": len(prompts), "anchors": len(anchors), "tokens": tokens,
                     "teacher_seconds": round(time.perf_counter() - start, 3), **chosen}


def build_terms(ctx, index: int, examples: list, base_dir: Path, metrics: dict, echo=None) -> tuple[list, dict | None]:
    """(loss terms for the loop, safety sensitivity for safety-aware allocation or None)."""
    recipe, stage = ctx.recipe, ctx.recipe.stages[index]
    pad = ctx.tokenizer.pad_token_id
    seed = recipe.seed * 1000 + index * 10 + 3
    terms, info, sensitivity = [], {}, None
    anchors = None
    need_sens = recipe.adapter.method == "lori-s" and recipe.adapter.allocation == "safety-aware" and stage.kind == "task"
    if stage.anchor is not None or need_sens:
        tokens = stage.anchor.tokens if stage.anchor is not None else 16
        anchors, info["anchor"] = teacher_anchors(ctx, index, base_dir, tokens, examples)
    if stage.anchor is not None and stage.anchor.loss == "kl":
        a = stage.anchor
        terms.append(KLAnchor("anchor_kl", ctx.layers, anchors, a.weight, a.batch_size, pad, seed, a.cache_mb, echo,
                              a.every))
    elif stage.anchor is not None:
        a = stage.anchor
        direction = load_direction(stage_dir(ctx.out, 0, recipe.stages[0].name) / DIRECTION_FILE)
        term = DirectionAnchor(ctx.layers, [prompt_part(x) for x in anchors], direction, a.weight, a.batch_size,
                               pad, seed)
        info["anchor"]["direction_layer"] = term.layer
        terms.append(term)
    if stage.replay is not None and stage.replay.distill > 0:
        r = stage.replay
        rows = [ex for ex in examples if ex.meta.get("replay")]
        encoded = [e for e in (encode_anchor(ctx.tokenizer, ex.prompt_messages, ex.response, r.distill_tokens)
                               for ex in rows) if e is not None]
        terms.append(KLAnchor("replay_distill", ctx.layers, encoded, r.distill, r.distill_batch_size, pad, seed + 1,
                              1024, echo))
        info["replay_distill"] = {"rows": len(encoded), "tokens": r.distill_tokens, "weight": r.distill}
    if need_sens:
        start = time.perf_counter()
        sensitivity = safety_sensitivity(ctx.model, ctx.layers, anchors, pad)
        info["allocation"] = {"rule": "safety-aware", "strength": recipe.adapter.allocation_strength,
                              "sensitivity_anchors": len(anchors),
                              "sensitivity_seconds": round(time.perf_counter() - start, 3)}
    if info:
        metrics["mechanisms"] = {**metrics.get("mechanisms", {}), **info}
    return terms, sensitivity


_TEACHER_OF = {"anchor_kl": "anchor", "replay_distill": "replay_distill"}


def record_teachers(terms: list, metrics: dict) -> None:
    """After the stage: how each KL term got its teacher (cached or recomputed, MB, seconds), as
    ``teacher_cache`` of its mechanism's entry."""
    for term in terms:
        if getattr(term, "info", None) and term.name in _TEACHER_OF:
            entry = metrics.setdefault("mechanisms", {}).setdefault(_TEACHER_OF[term.name], {})
            entry["teacher_cache"] = dict(term.info)


def compute_direction(ctx, base_dir: Path, sdir: Path) -> dict | None:
    """After the safety stage: the refusal direction, saved in its stage directory."""
    cfg = ctx.recipe.refusal_direction
    if cfg is None:
        return None
    start = time.perf_counter()
    seed = ctx.recipe.seed
    harmful, _ = load_examples(cfg.harmful, base_dir, seed=seed, need_response=False)
    harmless, _ = load_examples(cfg.harmless, base_dir, seed=seed, need_response=False)
    info = refusal_direction(ctx.model, ctx.tokenizer, [e.prompt_messages for e in harmful],
                             [e.prompt_messages for e in harmless], cfg.batch_size)
    if ctx.main:
        save_direction(sdir / DIRECTION_FILE, info)
    out = {"file": DIRECTION_FILE, "best_layer": info["best_layer"], "n_harmful": len(harmful),
           "n_harmless": len(harmless), "separation_best": float(info["separation"][info["best_layer"]]),
           "seconds": round(time.perf_counter() - start, 3)}
    ref = compute_probe_reference(ctx, base_dir, sdir, info, harmful)
    if ref is not None:
        out["probe"] = ref
    return out


def safety_merge(ctx, index: int, before: dict, safety_B: dict) -> dict | None:
    """After a task stage's commit: scale its part where it conflicts with the safety stage's."""
    cfg = ctx.recipe.stages[index].merge
    if cfg is None:
        return None
    start = time.perf_counter()
    B = {n: layer.B_frozen for n, layer in ctx.layers.items()}
    A = {n: layer.A.detach() for n, layer in ctx.layers.items()}
    part = {n: (B[n] - before[f"{n}.B"]).detach() for n in B}
    # for lori-s the difference is exactly the stage's entries (disjoint masks): zero elsewhere
    result = merge_conflicts(B, A, part, safety_B, cfg.threshold, cfg.scale)
    cos = torch.tensor(list(result["cosines"].values()))
    return {"threshold": cfg.threshold, "scale": cfg.scale, "modules": len(B), "scaled": len(result["scaled"]),
            "scaled_modules": result["scaled"][:50], "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "cosine_max": float(cos.max()), "seconds": round(time.perf_counter() - start, 3)}


def after_training(ctx, index: int, before: dict, safety_B: dict, base_dir: Path, sdir: Path, metrics: dict,
                   echo) -> dict:
    """After a stage's commit: the refusal direction (safety stage) or the safety merge (task
    stage with ``merge``); returns B after the safety stage (the merge's reference)."""
    if index == 0:
        direction = compute_direction(ctx, base_dir, sdir)
        if direction is not None:
            metrics["refusal_direction"] = direction
        return {n: layer.B_frozen.detach().clone() for n, layer in ctx.layers.items()}
    merged = safety_merge(ctx, index, before, safety_B)
    if merged is not None:
        metrics.setdefault("mechanisms", {})["merge"] = merged
        echo(f"[safecl] safety merge: {merged['scaled']}/{merged['modules']} modules scaled by {merged['scale']:g} "
             f"(update cosine to the safety stage's: min {merged['cosine_min']:.3f}, mean {merged['cosine_mean']:.3f})")
    return safety_B
