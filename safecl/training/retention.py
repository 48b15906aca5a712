"""The retention check and gate wired into the stage sequence.

After the base model (row ``base``) and after every stage, the tracker runs the check on the
model as it is (every task of the recipe with ``retention.score_all_tasks``, else the tasks of
the stages run so far), adds the row to the R matrix, saves ``retention.json`` and asks the gate.
Acting on the gate (rollback, halt) is the runner's job; this only measures and decides.

With several processes, every rank generates for its share of the prompts (every
``num_processes``-th one), the responses are gathered, and every rank judges the same full
list, so every rank reaches the same gate decision; only the main process writes files.
"""

from __future__ import annotations

from pathlib import Path

from safecl.data.sources import load_examples
from safecl.evaluation.answers import ANSWERS, BASE_ANSWERS, write_answers
from safecl.evaluation.check import run_retention_check
from safecl.evaluation.generation import generate
from safecl.evaluation.gate import GateDecision, decide
from safecl.evaluation.judges import make_judge
from safecl.evaluation.matrix import BASE, FILENAME, RetentionMatrix
from safecl.faults import fault_point
from safecl.recipe.schema import Recipe
from safecl.training.rundir import stage_dir, write_json
from safecl.training.sharding import is_sharded


def sharded_generate(accelerator):
    """A ``generate`` that splits prompts across processes and gathers the responses in order."""
    from accelerate.utils import gather_object

    def run(model, tokenizer, prompts, *args, **kwargs):
        mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
        run_on = list(mine)
        if is_sharded(model) and prompts:  # every rank runs the same number of batches (forwards all-gather)
            width = -(-len(prompts) // accelerator.num_processes)
            run_on += [run_on[-1] if run_on else 0] * (width - len(run_on))
        local = generate(model, tokenizer, [prompts[i] for i in run_on], *args, **kwargs) if run_on else []
        responses: list = [None] * len(prompts)
        for i, r in gather_object(list(zip(mine, local[:len(mine)]))):  # padding answers are dropped
            responses[i] = r
        return responses

    return run


SAMPLES = 5  # answers kept in metrics.json per set; every answer is in the answers file


class RetentionTracker:
    def __init__(self, recipe: Recipe, base_dir: Path, out: Path, model, tokenizer, enabled: bool, echo=print,
                 resume_rows: list[str] | None = None, accelerator=None, main: bool = True):
        self.recipe = recipe
        self.base_dir = base_dir
        self.out = Path(out)
        self.model = model
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.echo = echo
        self.main = main
        multi = accelerator is not None and accelerator.num_processes > 1
        self._generate = sharded_generate(accelerator) if multi else None
        self.matrix = RetentionMatrix(safety_stage=recipe.stages[0].name)
        self._task_examples: dict[str, list] = {}
        self._judge = make_judge(recipe.retention.judge) if enabled else None
        if resume_rows is not None and (self.out / FILENAME).is_file():
            # keep only rows of completed checkpoints; an interrupted stage is checked again
            old = RetentionMatrix.load(self.out / FILENAME)
            for row in old.rows:
                if row["stage"] in resume_rows:
                    self.matrix.rows.append(row)

    def has_row(self, stage_name: str) -> bool:
        return stage_name in self.matrix.stages

    def _load_task(self, cfg):
        """A task's eval examples, read once per run (every later check scores them again)."""
        key = cfg.model_dump_json()
        if key not in self._task_examples:
            self._task_examples[key], _ = load_examples(cfg, self.base_dir, seed=self.recipe.seed,
                                                        need_response=False)
        return self._task_examples[key]

    def _check(self, upto: int, label: str):
        stages = self.recipe.stages if self.recipe.retention.score_all_tasks else self.recipe.stages[: upto + 1]
        tasks = [(s.name, s.eval) for s in stages if s.eval is not None]
        result = run_retention_check(self.model, self.tokenizer, self.recipe.retention, tasks, self.base_dir,
                                     self.recipe.seed, self._load_task, judge=self._judge, keep_samples=None,
                                     generate_fn=self._generate, progress=None if self.main else False)
        fault_point("check")
        scores = result.scores()
        self.echo(f"[safecl] retention after {label}: " + ", ".join(
            f"{k}={v:.3f}" for k, v in scores.items()) + f" ({result.seconds:.1f}s)")
        return result

    def check_base(self) -> dict[str, float]:
        """Check the untrained model (row ``base``); returns its scores."""
        result = self._check(-1, "base model")
        self.matrix.add_row(BASE, result.scores(), values=result.values())
        if self.main:
            self.matrix.save(self.out / FILENAME)
            write_json(self.out / "base_check.json", result.to_dict(keep=SAMPLES))
            write_answers(self.out / BASE_ANSWERS, result)
        return result.scores()

    def check_stage(self, index: int, metrics: dict, row: str | None = None) -> GateDecision | None:
        """Check after stage ``index``; records the result and the gate decision in ``metrics``
        (and rewrites the stage's metrics.json). None when the check is off.

        ``row``: the matrix row's name when it is not the recipe stage's (a repair pass of it)."""
        if not self.enabled:
            return None
        stage = self.recipe.stages[index]
        name = row or stage.name
        result = self._check(index, f"stage '{name}'")
        self.matrix.add_row(name, result.scores(), values=result.values())
        if self.main:
            self.matrix.save(self.out / FILENAME)
        decision = decide(self.matrix, self.recipe.gate, name)
        metrics["retention"] = result.to_dict(keep=SAMPLES)
        metrics["gate"] = decision.to_dict()
        if decision.fired:
            self.echo(f"[safecl] GATE {decision.action.upper()}: " + "; ".join(decision.reasons))
        if self.main:
            write_answers(stage_dir(self.out, index, name) / ANSWERS, result)
            write_json(stage_dir(self.out, index, name) / "metrics.json", metrics)
        return decision

    def mark_rolled_back(self, stage_name: str) -> None:
        if self.enabled:
            self.matrix.mark_rolled_back(stage_name)
            if self.main:
                self.matrix.save(self.out / FILENAME)

    def summary(self) -> dict | None:
        return self.matrix.summary() if self.enabled and self.matrix.rows else None
