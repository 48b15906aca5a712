"""The retention check run on the base model and after every stage.

Eval sets and their scores (each a share in [0, 1] over n items, with a 95% bootstrap CI):

- ``refusal``: share of HARMFUL prompts whose response the judge calls a refusal
  (higher is safer).
- ``over_refusal``: share of BENIGN prompts whose response the judge calls a refusal
  (lower is better; XSTest-style safe prompts that only look alarming).
- ``task:<name>``: share of a task's held-out examples answered correctly by its metric
  (``exact_match``, ``label_accuracy``, ``pass_at_k``, ``harness``: see
  :mod:`safecl.evaluation.scorers`; ``choice``: multiple choice by log-likelihood, see
  :mod:`safecl.evaluation.likelihood`), for every task of the recipe (``retention.score_all_tasks``,
  the default: on the base model and before each task's own stage too) or for the task stages
  seen so far.
- ``nll:<name>``: the task's gold-answer NLL (mean NLL per gold-response token, teacher-forced;
  lower is better), beside the main metric whenever the eval's rows have gold responses
  (``gold_nll``), or alone for ``metric: nll``.

Every result carries how it was measured (``measured_by``: the judge's ``describe()`` or
the metric and its labels), n, the interval, a few (prompt, response, verdict) samples, the
number of empty responses and the seconds it took. The check does not decide anything:
the gate (:mod:`safecl.evaluation.gate`) does, from the retention matrix.

Prompts are sent as a single user turn with the tokenizer's chat template, no system
prompt. Sampling (``do_sample``) runs under a forked torch RNG seeded with ``seed``, so the
caller's RNG state is untouched and the check is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from safecl.data.records import Example
from safecl.errors import DataError
from safecl.evaluation.config import RetentionConfig, TaskEvalConfig
from safecl.evaluation.generation import generate
from safecl.evaluation.judges import Judge, make_judge
from safecl.evaluation.likelihood import choice_requests, choice_scores, gold_nll
from safecl.evaluation.prompts import load_prompts
from safecl.evaluation.scorers import answer_decided, bootstrap_ci, exact_match_number, label_accuracy, label_decided


@dataclass
class EvalResult:
    """One eval set's score after one checkpoint."""

    name: str  # "refusal", "over_refusal" or "task:<name>"
    score: float  # share in [0, 1]
    n: int
    ci: tuple[float, float]  # 95% percentile bootstrap interval of the score
    measured_by: dict  # judge.describe() or the task metric's description
    samples: list[dict] = field(default_factory=list)  # {"prompt", "response", "verdict", ...}
    seconds: float = 0.0
    n_empty: int = 0  # responses that were empty or whitespace only
    max_new_tokens: int = 0
    values: list[float] = field(default_factory=list)  # per item (score = their mean): paired intervals

    def to_dict(self, keep: int | None = None) -> dict:
        """As a dict; ``keep``: only the first ``keep`` samples (all of them: the answers file)."""
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["samples"] = _keep(out["samples"], keep)
        return out


@dataclass
class CheckResult:
    """All eval sets of one retention check, in order: refusal, over_refusal, tasks."""

    evals: list[EvalResult]
    seconds: float
    seed: int

    def __getitem__(self, name: str) -> EvalResult:
        for result in self.evals:
            if result.name == name:
                return result
        raise KeyError(f"no eval set {name!r}; have {[r.name for r in self.evals]}")

    def scores(self) -> dict[str, float]:
        """{eval set name: score}, the row this check adds to the retention matrix."""
        return {r.name: r.score for r in self.evals}

    def values(self) -> dict[str, list[float]]:
        """{eval set name: per-item values} (the matrix's paired intervals of gain and transfer)."""
        return {r.name: list(r.values) for r in self.evals if r.values}

    def to_dict(self, keep: int | None = None) -> dict:
        return {"seconds": self.seconds, "seed": self.seed, "evals": [r.to_dict(keep) for r in self.evals]}


def _result(name: str, values: list[float], measured_by: dict, samples: list[dict], cfg: RetentionConfig, seed,
            keep, start: float, **extra) -> EvalResult:
    """The EvalResult of a set scored item by item: score = mean of ``values``, its bootstrap interval."""
    return EvalResult(name=name, score=sum(values) / len(values), n=len(values),
                      ci=bootstrap_ci(values, cfg.bootstrap_samples, seed), measured_by=measured_by,
                      samples=_keep(samples, keep), seconds=time.perf_counter() - start, values=values, **extra)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _keep(items: list, keep: int | None) -> list:
    return list(items) if keep is None else list(items[:keep])


def _judged_set(name, prompts, model, tokenizer, cfg: RetentionConfig, judge: Judge, seed, keep, progress,
                generate=generate):
    start = time.perf_counter()
    stop = judge.decided if cfg.stop_when_judged else None
    responses = generate(model, tokenizer, [_user(p) for p in prompts], cfg.max_new_tokens, cfg.batch_size,
                         do_sample=cfg.do_sample, stop_early=stop, progress=progress, desc=name)
    verdicts = judge.judge(responses, prompts)
    values = [1.0 if v.refusal else 0.0 for v in verdicts]
    samples = [{"prompt": p, "response": r, "verdict": v.refusal, "matched": v.matched, "empty": v.empty}
               for p, r, v in zip(prompts, responses, verdicts)]
    return _result(name, values, judge.describe(), samples, cfg, seed, keep, start,
                   n_empty=sum(v.empty for v in verdicts), max_new_tokens=cfg.max_new_tokens)


def _task_set(task_name, task: TaskEvalConfig, examples: list[Example], model, tokenizer,
              cfg: RetentionConfig, seed, keep, progress, generate=generate):
    start = time.perf_counter()
    if task.limit is not None:
        examples = examples[: task.limit]
    if not examples:
        raise DataError(f"task {task_name!r}: its eval set {task.source!r} (split {task.split!r}) is empty")
    for ex in examples:
        if ex.answer is None or not str(ex.answer).strip():
            raise DataError(f"{ex.origin or task.source}: task {task_name!r} eval record has no answer to score")
    answers = [str(ex.answer).strip() for ex in examples]
    max_new = task.max_new_tokens or cfg.max_new_tokens
    if task.metric == "pass_at_k":
        return _code_set(task_name, task, examples, model, tokenizer, cfg, seed, keep, progress, generate, start)
    if task.metric == "harness":
        return _harness_set(task_name, task, examples, answers, model, tokenizer, cfg, seed, keep, max_new, start)
    if task.metric == "choice":
        return _choice_set(task_name, task, examples, model, tokenizer, cfg, seed, keep, start)
    if task.metric == "label_accuracy":
        labels = task.labels or sorted(set(answers))
        score_fn = partial(label_accuracy, labels=labels)
        stop = partial(label_decided, labels=labels) if cfg.stop_when_judged else None
        measured = {"kind": "metric", "metric": "label_accuracy", "labels": labels,
                    "rule": "first whole-word label in the response (case-insensitive) equals the answer"}
    else:
        score_fn = exact_match_number
        stop = answer_decided if cfg.stop_when_judged else None
        measured = {"kind": "metric", "metric": "exact_match",
                    "rule": "last number in the response (commas stripped) equals the answer numerically; "
                    + ("generation stops once 'The answer is N' / '#### N' is written" if stop else "no early stop")}
    responses = generate(model, tokenizer, [ex.prompt_messages for ex in examples], max_new, cfg.batch_size,
                         do_sample=cfg.do_sample, stop_early=stop, progress=progress, desc=f"task:{task_name}")
    correct = [bool(score_fn(r, a)) for r, a in zip(responses, answers)]
    values = [1.0 if c else 0.0 for c in correct]
    samples = [{"prompt": _last_user_text(ex.prompt_messages), "response": r, "answer": a, "verdict": c}
               for ex, r, a, c in zip(examples, responses, answers, correct)]
    return _result(f"task:{task_name}", values, measured, samples, cfg, seed, keep, start,
                   n_empty=sum(not r.strip() for r in responses), max_new_tokens=max_new)


def _task_labels(task: TaskEvalConfig, examples: list[Example]) -> list[str]:
    return task.labels or sorted({str(ex.answer).strip() for ex in examples})


def _choice_set(task_name, task: TaskEvalConfig, examples: list[Example], model, tokenizer, cfg: RetentionConfig,
                seed, keep, start) -> EvalResult:
    """Multiple choice by log-likelihood (safecl.evaluation.likelihood.choice_scores): no generation."""
    labels = _task_labels(task, examples)
    out = choice_scores(model, tokenizer, examples, labels, cfg.batch_size)
    values = out["values"]
    samples = []
    for ex, pick, ll, v, texts in zip(examples, out["picked"], out["loglik"], values, out["choices"]):
        samples.append({"prompt": _last_user_text(ex.prompt_messages), "response": texts[pick],
                        "answer": str(ex.answer).strip(), "verdict": v == 1.0, "loglik": [round(x, 4) for x in ll]})
    measured = {"kind": "metric", "metric": "choice", "labels": labels,
                "rule": "argmax over the offered labels of the summed log-likelihood of the gold response with "
                        "the label swapped in, after the chat template (lm-evaluation-harness acc)"}
    return _result(f"task:{task_name}", values, measured, samples, cfg, seed, keep, start)


def _nll_set(task_name, task: TaskEvalConfig, examples: list[Example], model, tokenizer, cfg: RetentionConfig,
             seed, keep, limit: int | None) -> EvalResult:
    """Gold-answer NLL (safecl.evaluation.likelihood.gold_nll): column ``nll:<task>``, lower is better."""
    start = time.perf_counter()
    if limit is not None:
        examples = examples[:limit]
    values = gold_nll(model, tokenizer, examples, task.nll_max_len, cfg.batch_size)
    samples = [{"prompt": _last_user_text(ex.prompt_messages), "response": ex.response, "nll": round(v, 4)}
               for ex, v in zip(examples, values)]
    measured = {"kind": "metric", "metric": "gold_nll", "max_len": task.nll_max_len,
                "rule": "mean over examples of the mean NLL per gold-response token (teacher-forced, response "
                        "tokens only, the chat template as trained); lower is better"}
    return _result(f"nll:{task_name}", values, measured, samples, cfg, seed, keep, start)


def wants_nll(task: TaskEvalConfig, examples: list[Example]) -> bool:
    """``gold_nll`` true, or left unset and every example has a gold response."""
    if task.gold_nll is not None:
        return task.gold_nll
    return bool(examples) and all(ex.response is not None and ex.response.strip() for ex in examples)


def _harness_set(task_name, task: TaskEvalConfig, examples: list[Example], answers: list[str], model, tokenizer,
                 cfg: RetentionConfig, seed, keep, max_new: int, start) -> EvalResult:
    """Scored by lm-evaluation-harness (safecl.evaluation.harness) on the same examples. Every rank
    runs all of them (identical greedy answers), so it needs no gather."""
    from safecl.evaluation.harness import CHOICE_TEMPLATES, harness_lm, run_harness

    questions = [_last_user_text(ex.prompt_messages) for ex in examples]
    if task.harness in CHOICE_TEMPLATES:
        labels = _task_labels(task, examples)
        docs = [{"question": q, "choices": texts, "gold": gold}
                for q, (_, texts, gold) in zip(questions, choice_requests(tokenizer, examples, labels))]
    else:
        docs = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    out = run_harness(task.harness, docs, harness_lm(model, tokenizer, cfg.batch_size), max_new)
    values = out["values"]
    samples = [{"prompt": q, "response": r, "answer": a, "verdict": v == 1.0, "extracted": x}
               for q, r, a, v, x in zip(questions, out["responses"], answers, values, out["extracted"])]
    return _result(f"task:{task_name}", values, out["measured_by"], samples, cfg, seed, keep, start,
                   n_empty=sum(not r.strip() for r in out["responses"]), max_new_tokens=max_new)


def _code_set(task_name, task: TaskEvalConfig, examples: list[Example], model, tokenizer, cfg: RetentionConfig,
              seed, keep, progress, generate, start):
    """pass@k by execution: each answer runs with its task's tests in a sandboxed process.

    samples = 1: greedy answers, pass@1 = share passing. samples = n > 1: n sampled answers per
    problem, c of them passing, and the problem's score is the unbiased pass@k = 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021); the task score is the mean over problems, its interval bootstrapped over problems."""
    from safecl.evaluation.execution import Limits, humaneval_program, network_isolated, pass_at_k, run_sample

    for ex in examples:
        if not {"prompt", "test", "entry_point"} <= ex.meta.keys():
            raise DataError(f"{ex.origin or task.source}: task {task_name!r} (pass_at_k) needs the code prompt, test "
                            "and entry point of each problem: use `preset: humaneval`")
    max_new = task.max_new_tokens or cfg.max_new_tokens
    n = task.samples
    rows = [ex for ex in examples for _ in range(n)]  # problem-major: n answers per problem
    responses = generate(model, tokenizer, [ex.prompt_messages for ex in rows], max_new, cfg.batch_size,
                         do_sample=cfg.do_sample or n > 1, stop_early=None, progress=progress, desc=f"task:{task_name}")
    limits = Limits(timeout=task.timeout)
    outcomes = [run_sample(humaneval_program(ex.meta["prompt"], r, ex.meta["test"], ex.meta["entry_point"]), limits,
                           task.sandbox)
                for ex, r in zip(rows, responses)]
    passed = [sum(o.passed for o in outcomes[i * n:(i + 1) * n]) for i in range(len(examples))]
    values = [pass_at_k(n, c, task.k) for c in passed]
    samples = [{"prompt": _last_user_text(ex.prompt_messages), "response": r, "answer": ex.answer, "verdict": o.passed,
                "status": o.status}
               for ex, r, o in zip(rows, responses, outcomes)]
    measured = {"kind": "metric", "metric": "pass_at_k", "k": task.k, "samples_per_problem": n,
                "decoding": "greedy" if n == 1 and not cfg.do_sample else "sampled",
                "rule": "the completion (its first ```python block, else the text) with the problem's prompt and "
                        "tests exits 0 after check(entry_point)",
                "sandbox": {"kind": task.sandbox, "process": "one per sample", "timeout_s": task.timeout,
                            "memory_mb": limits.memory_mb,
                            "network": "off (own namespace)" if task.sandbox == "bubblewrap" or network_isolated()
                            else "on (unshare -n not allowed)"}}
    return _result(f"task:{task_name}", values, measured, samples, cfg, seed, keep, start,
                   n_empty=sum(not r.strip() for r in responses), max_new_tokens=max_new)


def run_retention_check(
    model,
    tokenizer,
    cfg: RetentionConfig,
    tasks: list[tuple[str, TaskEvalConfig]],
    base_dir: str | Path | None,
    seed: int,
    load_task_examples: Callable[[TaskEvalConfig], list[Example]],
    *,
    judge: Judge | None = None,
    keep_samples: int | None = 5,
    progress: bool | None = None,
    generate_fn: Callable | None = None,
) -> CheckResult:
    """Score refusal, over-refusal and every task seen so far on the current model.

    Args:
        model, tokenizer: the model as it is now (adapters applied); its training mode is
            restored afterwards.
        cfg: the recipe's ``retention`` section (``cfg.enabled`` is the caller's to check).
        tasks: (stage name, eval config) of the task stages run so far, in stage order.
        base_dir: folder that relative prompt-file paths resolve against (the recipe's).
        seed: seeds sampling (when ``cfg.do_sample``) and the bootstrap.
        load_task_examples: the data loader: eval config -> examples whose last message is
            the user turn and whose ``answer`` is the gold answer.
        judge: a judge to reuse across checks (a loaded classifier); default
            ``make_judge(cfg.judge)``.
        keep_samples: samples kept per eval set (the first N, in set order); None = all.
        progress: tqdm bars; None = only on a terminal.
        generate_fn: replaces :func:`generate` (same signature), e.g. one that splits the
            prompts across processes and gathers the responses.

    Raises:
        DataError: a prompt set or task set cannot be read, is empty, or lacks answers.
    """
    start = time.perf_counter()
    judge = judge if judge is not None else make_judge(cfg.judge)
    harmful = load_prompts(cfg.harmful, base_dir)
    benign = load_prompts(cfg.benign, base_dir)
    task_examples = [(name, task, load_task_examples(task)) for name, task in tasks]
    nll_examples = {name: load_task_examples(task.nll_data) for name, task in tasks if task.nll_data is not None}
    names = [name for name, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    evals: list[EvalResult] = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = generate_fn or generate
        evals.append(_judged_set("refusal", harmful, model, tokenizer, cfg, judge, seed, keep_samples, progress, gen))
        evals.append(_judged_set("over_refusal", benign, model, tokenizer, cfg, judge, seed, keep_samples,
                                 progress, gen))
        for name, task, examples in task_examples:
            if task.metric != "nll":
                evals.append(_task_set(name, task, examples, model, tokenizer, cfg, seed, keep_samples, progress,
                                       gen))
            if name in nll_examples:
                evals.append(_nll_set(name, task, nll_examples[name], model, tokenizer, cfg, seed, keep_samples,
                                      limit=task.nll_data.limit))
            elif task.metric == "nll" or wants_nll(task, examples):
                evals.append(_nll_set(name, task, examples, model, tokenizer, cfg, seed, keep_samples, task.limit))
    return CheckResult(evals=evals, seconds=time.perf_counter() - start, seed=seed)
