"""Gate action ``repair``: when a stage fails the retention gate, train a short safety pass on
newly allocated free entries, re-check, and give up after ``gate.repair.attempts`` passes.

A repair pass is a stage of kind ``safety`` named ``<stage>.repair<k>`` with its own stage
directory (``stages/<NN>-<stage>.repair<k>/``: cumulative adapter, mask, metrics), its own row
in the R matrix, its own run.json entry (``repair_of``) and MLflow child run, so the audit shows
it like any other stage. For lori-s its mask is disjoint from every earlier stage's (the task
stage's entries included): the task's update is kept, the repair adds safety beside it.
"""

from __future__ import annotations

from safecl.adapters.export import save_mask, save_peft_adapter
from safecl.data.formatting import encode_all
from safecl.data.sources import load_examples
from safecl.training.calibration import calibration_length
from safecl.training.rundir import stage_dir, write_json
from safecl.training.stage import StagePlan, train_stage


def repair(ctx, plan, stage_name: str, decision, tracker, owned: list, safety_examples: list, base_dir, mlflow,
           run_info: dict, echo) -> tuple:
    """Run repair passes while the gate fires; returns (last decision, entries for run.json)."""
    recipe, cfg = ctx.recipe, ctx.recipe.gate.repair
    entries = []
    examples = safety_examples
    if cfg.data is not None:
        examples, _ = load_examples(cfg.data, base_dir, seed=recipe.seed + 99)
    base = recipe.stage_settings(0)
    settings = base.model_copy(update={"max_steps": cfg.steps, "lr": cfg.lr or base.lr})
    encoded, _ = encode_all(ctx.tokenizer, examples, settings.max_seq_len)
    lori_s = recipe.adapter.method == "lori-s"
    for attempt in range(1, cfg.attempts + 1):
        if not (decision is not None and decision.fired and decision.action == "repair"):
            break
        name = f"{stage_name}.repair{attempt}"
        sdir = stage_dir(ctx.out, plan.index, name)
        rplan = StagePlan(plan.index, name, "safety", len(examples), cfg.steps, settings.lr, settings.batch_size,
                          settings.grad_accum, settings.max_seq_len, cfg.density if lori_s else None,
                          calibration_length(recipe.adapter, cfg.steps) if lori_s else None)
        echo(f"[safecl] REPAIR {attempt}/{cfg.attempts} of stage '{stage_name}': {cfg.steps} safety steps"
             + (f" on {cfg.density:g} of B (free entries)" if lori_s else ""))
        metrics = {"stage": name, "index": plan.index, "kind": "safety", "repair_of": stage_name, "attempt": attempt,
                   "method": recipe.adapter.method, "data": {"rows": len(examples), "encoded": len(encoded)},
                   "settings": settings.model_dump()}
        mlflow.start_stage(plan.index, name, {"kind": "safety", "repair_of": stage_name, "steps": cfg.steps})
        mask = train_stage(ctx, rplan, encoded, owned, metrics, sdir, None, settings=settings,
                           seed=recipe.seed * 1000 + plan.index * 10 + 5 + attempt)
        if ctx.main:
            a = recipe.adapter
            save_peft_adapter(ctx.layers, sdir / "adapter", rank=a.rank, alpha=a.alpha, targets=a.target_modules,
                              base_model=recipe.model.name, dropout=a.dropout,
                              extra={"stage": name, "index": plan.index, "method": a.method, "repair_of": stage_name})
            if mask is not None:
                save_mask(mask, sdir / "mask.safetensors")
            write_json(sdir / "metrics.json", metrics)
        if mask is not None:
            owned.append(mask)
        decision = tracker.check_stage(plan.index, metrics, row=name)
        mlflow.end_stage(name, metrics, sdir)
        entries.append({"index": plan.index, "name": name, "kind": "safety", "repair_of": stage_name,
                        "dir": str(sdir.relative_to(ctx.out)), "train_seconds": metrics["train"]["seconds"],
                        "check_seconds": metrics.get("retention", {}).get("seconds"),
                        "gate": decision.action if decision is not None else None})
    return decision, entries
