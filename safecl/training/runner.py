"""The stage sequence: data -> (calibrate -> mask) -> train -> commit -> save -> check -> gate.

``run_recipe`` is what ``safecl train`` calls. Stage 0 is the safety stage; each later stage
trains only its own part of the adapter (a disjoint sparse mask for lori-s), so what earlier
stages learned stays bit-identical in B_frozen.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from safecl import __version__
from safecl.adapters import inject_adapters, restore, snapshot
from safecl.adapters.export import load_mask, save_mask, save_peft_adapter
from safecl.adapters.masks import total_entries
from safecl.data.formatting import encode_all
from safecl.data.sources import load_examples
from safecl.errors import GateHalt, TrainingError
from safecl.evaluation.answers import BASE_ANSWERS
from safecl.evaluation.gate import GateDecision
from safecl.faults import fault_point
from safecl.integrity import digests, verify_stage
from safecl.models import load_model_and_tokenizer
from safecl.recipe.loader import dump_recipe, recipe_dir
from safecl.recipe.schema import Recipe
from safecl.training.allocator import tune_for_cpu_training
from safecl.training.calibration import calibration_length
from safecl.training.loop import total_steps
from safecl.training.adopt import adopt_stages, write_adopted
from safecl.training.sharding import collective_timeout, fsdp_requested, local_share, refuse_deepspeed, shard_base
from safecl.training.mechanisms import (DIRECTION_FILE, after_training, apply_replay, build_terms, check_sources,
                                        compute_direction, record_teachers)
from safecl.training.probing import build_monitor, compute_probe_reference, probe_reference_outdated, record_probe
from safecl.tracking import Tracker
from safecl.training.checkpoint import check_resumable, forget_stages, load_stage_adapter, readable_checkpoint
from safecl.training.repair import repair
from safecl.training.retention import RetentionTracker
from safecl.training.rundir import RunLock, read_json, stage_dir, write_json, write_text
from safecl.training.stage import RunContext, StagePlan, train_stage


@dataclass
class RunResult:
    output_dir: Path
    status: str
    stages: list[dict] = field(default_factory=list)
    model: object = None  # the in-memory model with its adapter layers (for tests and notebooks)
    tokenizer: object = None
    main: bool = True


def make_plan(recipe: Recipe, base_dir: Path) -> tuple[list[StagePlan], list]:
    """Load every stage's data (no model needed), mix replay rows in, work out steps and masks."""
    plans, datasets, pools = [], [], {}
    for i, stage in enumerate(recipe.stages):
        s = recipe.stage_settings(i)
        examples, report = load_examples(stage.data, base_dir, seed=recipe.seed + i)
        pools.setdefault(0, examples)
        examples, replay = apply_replay(recipe, i, examples, pools, base_dir)
        steps = total_steps(len(examples), s)
        lori_s = recipe.adapter.method == "lori-s"
        plans.append(StagePlan(i, stage.name, stage.kind, len(examples), steps, s.lr, s.batch_size, s.grad_accum,
                               s.max_seq_len, recipe.stage_density(i) if lori_s else None,
                               calibration_length(recipe.adapter, steps) if lori_s else None))
        datasets.append((examples, report, replay))
    check_sources(recipe, base_dir)
    return plans, datasets


def check_output_dir(out: Path, resolved: str, resume: bool, command: str) -> None:
    """Refuse an output_dir that holds a different run (an unwritable one was refused when its
    lock was taken). ``command``: the user's train command without --resume (named in the messages)."""
    prev = out / "recipe.resolved.yaml"
    if resume:
        check_resumable(out, resolved)
    elif prev.is_file() and prev.read_text(encoding="utf-8") != resolved:
        raise TrainingError(f"output_dir {out} holds a different run (its recipe.resolved.yaml differs); "
                            "choose another output_dir or delete that one")
    elif prev.is_file():
        status = read_json(out / "run.json").get("status") if (out / "run.json").is_file() else "interrupted"
        status = "interrupted" if status == "running" else status  # we hold the lock: nobody is running it
        raise TrainingError(f"output_dir {out} already holds a {status} run of this recipe; "
                            + (f"continue it with: {command} --resume" if status != "completed"
                               else "choose another output_dir"))


def _echo(message: str) -> None:
    print(message, flush=True)


def _silent(message: str) -> None:
    pass


def run_recipe(recipe: Recipe, recipe_path: str | Path, echo=_echo, resume: bool = False,
               restart_from: str | None = None, command: str | None = None) -> RunResult:
    """Run every stage of ``recipe``; returns where the run is and how it ended.

    ``resume``: continue the run in ``output_dir``: completed stages are rebuilt from their
    saved adapters and masks (checksums verified), an interrupted stage continues from its last
    checkpoint; a directory that holds no run yet (interrupted before it started) is started.
    ``restart_from``: with ``resume``, retrain this stage and every later one (earlier stages
    stay as committed, bit for bit). ``command``: the user's command line without --resume,
    named in messages. The main process holds the run directory's lock throughout.
    Raises GateHalt when the retention gate halts the run (earlier stages stay on disk).
    """
    out = Path(recipe.output_dir)
    command = command or f"safecl train {recipe_path}"
    refuse_deepspeed()
    if not torch.cuda.is_available():
        tune_for_cpu_training()  # reuse freed host memory step to step (training/allocator.py)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[collective_timeout()])
    with RunLock(out) if accelerator.is_main_process else nullcontext():
        return _run(recipe, recipe_path, accelerator, echo, resume, restart_from, command)


def _device_name(accelerator) -> str:
    """Where the run trained, for the record: e.g. 'cuda (NVIDIA H200) x 2 processes'."""
    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    procs = accelerator.num_processes
    fsdp = ", FSDP2" if fsdp_requested() else ""
    return dev.type + (f" ({name})" if name else "") + (f" x {procs} processes" if procs > 1 else "") + fsdp


def _run(recipe: Recipe, recipe_path, accelerator, echo, resume: bool, restart_from: str | None,
         command: str) -> RunResult:
    base_dir = recipe_dir(recipe_path)
    out = Path(recipe.output_dir)
    resolved = dump_recipe(recipe)
    main = accelerator.is_main_process
    if not main:
        echo = _silent
    if resume and not (out / "recipe.resolved.yaml").is_file():
        echo(f"[safecl] --resume: {out} holds no run yet (it was stopped before it started); starting it")
        resume = False
    if restart_from is not None and not resume:
        raise TrainingError("--restart-from needs --resume (it retrains stages of an existing run)")
    if main:
        check_output_dir(out, resolved, resume, command)
    set_seed(recipe.seed)
    plans, datasets = make_plan(recipe, base_dir)
    model, tokenizer = load_model_and_tokenizer(recipe.model, seed=recipe.seed)
    a = recipe.adapter
    layers = inject_adapters(model, a.target_modules, a.rank, a.alpha, recipe.adapter_seed,
                             train_A=a.method == "lora", dropout=a.dropout)
    model.to(accelerator.device)
    if fsdp_requested():
        blocks = shard_base(model, layers, accelerator.device)
        held, total = local_share(model)
        echo(f"[safecl] FSDP2: base weights sharded over {accelerator.num_processes} processes ({blocks} blocks; "
             f"rank 0 holds {held:,} of {total:,} entries); adapters replicated")
    shapes = {n: tuple(l.B_frozen.shape) for n, l in layers.items()}
    ctx = RunContext(recipe, out, accelerator, model, tokenizer, layers, shapes, total_entries(shapes), main)
    previous = read_json(out / "run.json") if resume and (out / "run.json").is_file() else {}
    run_info = {"safecl_version": __version__, "status": "running", "started": _now(), "model": recipe.model.name,
                "method": a.method, "adapted_modules": len(layers), "b_entries": ctx.capacity,
                "device": _device_name(accelerator), "stages": []}
    run_info["resumed"] = previous.get("resumed", 0) + 1 if previous else 0
    adopted = bool(recipe.start_from) and not previous
    if adopted:  # a fresh run that starts from another run's stage: copy it in, then go on as resumed
        if main:
            started = adopt_stages(recipe, base_dir, out)
            write_adopted(out, dict(run_info), started)
            echo(f"[safecl] starting from {started['run']}:{started['stage']} (stages {', '.join(started['stages'])}; "
                 f"retention rows {started['retention_rows']})")
        accelerator.wait_for_everyone()
        previous = read_json(out / "run.json")
    run_info.update({k: previous[k] for k in ("started", "stages", "started_from") if k in previous})
    if restart_from is not None:
        previous = forget_stages(recipe, run_info, previous, restart_from, out, main, echo)
    done = {s["name"] for s in run_info["stages"]}
    mlflow = Tracker(recipe.tracking, out, enabled=main, run_name=out.name, existing=previous.get("mlflow"))
    run_info["mlflow"] = mlflow.ids()
    if main:
        write_text(out / "recipe.resolved.yaml", resolved)
        write_json(out / "run.json", run_info)
    fault_point("started")
    mlflow.log_recipe(recipe.model_dump(mode="json"))
    tracker = RetentionTracker(recipe, base_dir, out, model, tokenizer, enabled=recipe.retention.enabled,
                               echo=echo, resume_rows=["base", *done] if resume or adopted else None,
                               accelerator=accelerator, main=main)
    if recipe.retention.check_base and tracker.enabled and not tracker.has_row("base"):
        mlflow.log_checkpoint(0, tracker.check_base(), None)
        mlflow.log_artifact(out / BASE_ANSWERS)
    owned: list[dict] = []
    safety_B: dict = {}  # B after the safety stage: the reference of the post-stage safety merge
    for plan, (examples, report, replay) in zip(plans, datasets):
        stage = recipe.stages[plan.index]
        sdir = stage_dir(out, plan.index, stage.name)
        if stage.name in done:  # completed before: rebuild, never recompute
            _rebuild_stage(ctx, run_info, plan.index, sdir, owned, command)
            if plan.index == 0:
                safety_B = {n: l.B_frozen.detach().clone() for n, l in layers.items()}
                if recipe.refusal_direction is not None and not (sdir / DIRECTION_FILE).is_file():
                    compute_direction(ctx, base_dir, sdir)
                elif probe_reference_outdated(ctx, base_dir, sdir):  # probe switched on or resized at resume
                    compute_probe_reference(ctx, base_dir, sdir)
                    entry = next(e for e in run_info["stages"] if e["name"] == stage.name)
                    if main and "files" in entry:  # the reference is part of the stage's commit
                        entry["files"] = digests(sdir)
                        write_json(out / "run.json", run_info)
            echo(f"[safecl] stage {plan.index} '{stage.name}' already complete: loaded from {sdir}")
            if adopted and tracker.enabled and not tracker.has_row(stage.name):
                tracker.check_stage(plan.index, read_json(sdir / "metrics.json"))  # rewrites its metrics.json
                entry = next(e for e in run_info["stages"] if e["name"] == stage.name)
                entry["files"] = digests(sdir) if main else {}
                if main:
                    write_json(out / "run.json", run_info)
            continue
        settings = recipe.stage_settings(plan.index)
        ckpt = readable_checkpoint(sdir, echo) if resume else None
        echo(f"[safecl] stage {plan.index} '{stage.name}' ({stage.kind}): {plan.examples} examples, {plan.steps} steps"
             + (f", resuming at step {ckpt['step']}" if ckpt else ""))
        encoded, too_long = encode_all(tokenizer, examples, settings.max_seq_len)
        before = snapshot(layers)
        metrics: dict = {"stage": stage.name, "index": plan.index, "kind": stage.kind, "method": a.method,
                         "data": {**report.to_dict(), "encoded": len(encoded), "dropped_too_long": too_long},
                         "settings": settings.model_dump()}
        if replay is not None:
            metrics["mechanisms"] = {"replay": {**replay, "distill": stage.replay.distill}}
        mlflow.start_stage(plan.index, stage.name, {"kind": stage.kind, "method": a.method, "steps": plan.steps,
                                                    "examples": plan.examples, **settings.model_dump()})
        terms, sensitivity = build_terms(ctx, plan.index, examples, base_dir, metrics, echo)
        monitor = build_monitor(ctx, plan.index, base_dir)
        mask = train_stage(ctx, plan, encoded, owned, metrics, sdir, ckpt, terms=terms, sensitivity=sensitivity,
                           monitors=[monitor] if monitor else None)
        record_teachers(terms, metrics)
        watched = record_probe(ctx, monitor, metrics, echo)
        safety_B = after_training(ctx, plan.index, before, safety_B, base_dir, sdir, metrics, echo)
        save_stage = _stage_writer(main, layers, recipe, sdir, stage, plan)
        save_stage(metrics, mask)
        echo(f"[safecl] stage {plan.index} '{stage.name}' trained: loss {metrics['train']['first_loss']:.4f} -> "
             f"{metrics['train']['last_loss']:.4f} in {metrics['train']['seconds']:.1f}s")
        decision = tracker.check_stage(plan.index, metrics)
        stage_entry = {"index": plan.index, "name": stage.name, "dir": str(sdir.relative_to(out)),
                       "train_seconds": metrics["train"]["seconds"],
                       "check_seconds": metrics.get("retention", {}).get("seconds"),
                       "gate": decision.action if decision is not None else None,
                       **({"watch": watched} if watched else {})}
        if decision is not None and decision.fired and decision.action == "rollback":
            restore(layers, before)
            tracker.mark_rolled_back(stage.name)
            metrics["rolled_back"] = True
            save_stage(metrics, None, rejected_mask=mask)
            stage_entry["rolled_back"] = True
            echo(f"[safecl] stage '{stage.name}' ROLLED BACK: the adapter is the previous stage's again")
        elif mask is not None:
            owned.append(mask)
        if decision is not None:
            scores = {e["name"]: e["score"] for e in metrics["retention"]["evals"]}
            mlflow.log_checkpoint(plan.index + 1, scores, tracker.matrix.safety_retention(stage.name))
        mlflow.end_stage(stage.name, metrics, sdir)
        repairs: list[dict] = []
        if decision is not None and decision.fired and decision.action == "repair":
            decision, repairs = repair(ctx, plan, stage.name, decision, tracker, owned, datasets[0][0], base_dir,
                                       mlflow, run_info, echo)
        for entry in (stage_entry, *repairs):  # the commit records what it commits
            entry["files"] = digests(out / entry["dir"]) if main else {}
        fault_point("commit.files")
        run_info["stages"] += [stage_entry, *repairs]
        run_info["mlflow"] = mlflow.ids()
        if main:
            write_json(out / "run.json", run_info)
            shutil.rmtree(sdir / "checkpoint", ignore_errors=True)
        if watched and watched["action"] == "halt":
            reasons = [f"probe retention {watched['probe_retention']:.2f} < gate.min_probe_retention "
                       f"{watched['threshold']:g} at step {watched['step']}"]
            decision = GateDecision(fired=True, action="halt", reasons=reasons)
        if decision is not None and decision.fired and (
            decision.action in ("halt", "repair")  # repair: still failing after every attempt
            or (decision.action == "rollback" and recipe.gate.after_rollback == "stop")
        ):
            run_info.update(status="halted", ended=_now(), halted_at=stage.name, reasons=decision.reasons)
            if main:
                write_json(out / "run.json", run_info)
            mlflow.end("halted")
            raise GateHalt(f"stage '{stage.name}' failed the retention gate ({decision.action}): "
                           + "; ".join(decision.reasons) + f". Earlier stages are intact in {out}")
    fault_point("end")
    if tracker.enabled and tracker.matrix.rows:
        mlflow.log_learning(tracker.matrix.learning())
    run_info.update(status="completed", ended=_now(), summary=tracker.summary())
    if main:
        write_json(out / "run.json", run_info)
    mlflow.end("completed")
    accelerator.wait_for_everyone()
    return RunResult(out, "completed", run_info["stages"], model=model, tokenizer=tokenizer, main=main)


def _rebuild_stage(ctx: RunContext, run_info: dict, index: int, sdir: Path, owned: list[dict], command: str) -> None:
    """Load a completed stage (after its last repair pass, if any) and its masks into ``owned``,
    after checking every committed file against the checksums of its run.json entry."""
    name = ctx.recipe.stages[index].name
    for entry in run_info["stages"]:
        if entry["name"] == name or entry.get("repair_of") == name:
            verify_stage(ctx.out / entry["dir"], entry, f"{command} --resume --restart-from {name}")
    repaired = [e for e in run_info["stages"] if e.get("repair_of") == name]
    load_stage_adapter(ctx.layers, (ctx.out / repaired[-1]["dir"] if repaired else sdir) / "adapter")
    for d in [sdir, *(ctx.out / e["dir"] for e in repaired)]:
        if (d / "mask.safetensors").is_file():
            owned.append(load_mask(d / "mask.safetensors"))


def _stage_writer(main: bool, layers, recipe: Recipe, sdir: Path, stage, plan):
    """A function that writes the stage's adapter, mask and metrics (main process only)."""
    a = recipe.adapter

    def save(metrics: dict, mask, rejected_mask=None) -> None:
        if not main:
            return
        save_peft_adapter(layers, sdir / "adapter", rank=a.rank, alpha=a.alpha, targets=a.target_modules,
                          base_model=recipe.model.name, dropout=a.dropout,
                          extra={"stage": stage.name, "index": plan.index, "method": a.method})
        fault_point("commit.adapter")
        if mask is not None:
            save_mask(mask, sdir / "mask.safetensors")
        if rejected_mask is not None:
            (sdir / "mask.safetensors").unlink(missing_ok=True)
            save_mask(rejected_mask, sdir / "mask.rolled_back.safetensors")
        write_json(sdir / "metrics.json", metrics)

    return save


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
