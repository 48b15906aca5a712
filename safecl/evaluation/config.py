"""Recipe sections for the retention check, its judges, task scoring and the forgetting gate."""

from typing import ClassVar, Literal

from pydantic import Field, PositiveFloat, PositiveInt, confloat, model_validator

from safecl.config import Section
from safecl.data.config import DataConfig, PresetSection
from safecl.safety.config import RepairConfig
from safecl.data.presets import PROMPT_PRESET_NAMES, PROMPT_PRESETS, fill_hub_source
from safecl.evaluation.sandbox import INSTALL, bubblewrap_problem

Fraction = confloat(ge=0.0, le=1.0)


class PromptSetConfig(PresetSection):
    """A set of prompts to generate from (harmful prompts, or benign prompts that look alarming).

    Formats: ``builtin`` (``builtin:<name>``), ``advbench`` (CSV, ``goal`` column), ``xstest``
    (CSV with ``prompt`` and ``label``; ``label`` below picks safe or unsafe rows), ``hexphi``
    (JSONL with ``instruction`` and ``category``), ``instructions`` (JSON list of strings or
    ``{"instructions": [...]}``), ``auto`` (guess from the file), or a hub dataset id.

    ``preset`` (``advbench``, ``xstest-safe``, ``xstest-unsafe``, ``hexphi``,
    ``malicious-instructions``; see :mod:`safecl.data.presets`) sets ``format`` and ``label``;
    ``source`` is then the file, or is left out for the preset's default hub id.
    """

    preset: Literal[PROMPT_PRESET_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="A public prompt set by name (see `safecl data list`); `source` then overrides its location."
    )
    source: str
    format: Literal["auto", "builtin", "advbench", "xstest", "hexphi", "instructions"] = "auto"
    split: str = "test"
    field: str | None = Field(None, description="Column that holds the prompt, when not the usual one.")
    label: Literal["safe", "unsafe"] | None = Field(None, description="XSTest: keep only rows with this label.")
    limit: PositiveInt | None = 32
    sample: bool = Field(
        False, description="Take `limit` prompts drawn with a fixed seed (0) instead of the first ones in file "
        "order, so a small limit spans the set's categories (AdvBench and XSTest files are grouped by topic)."
    )

    presets: ClassVar[dict] = PROMPT_PRESETS

    @classmethod
    def preset_defaults(cls, preset, data: dict) -> dict:
        """Fill ``source`` (and its split) from the preset's hub id, ``format`` and ``label`` from the preset."""
        data, filled = fill_hub_source(preset, data)
        if filled:
            data.setdefault("split", preset.hub_split)
        for key, value in (("format", preset.format), ("label", preset.label)):
            if data.get(key) is None:
                data[key] = value
            elif data[key] != value:
                raise ValueError(f"preset {preset.name!r} means {key} {value!r}, not {data[key]!r}; "
                                 f"drop `{key}` or the preset")
        return data


class JudgeConfig(Section):
    """How a response is judged a refusal. The response only is judged, never the prompt."""

    kind: Literal["keyword", "classifier"] = "keyword"
    phrases: Literal["safecl", "advbench", "qi2023"] | list[str] = Field(
        "safecl", description="Named refusal phrase list, or your own list."
    )
    mode: Literal["substring", "prefix"] = Field(
        "prefix", description="prefix: the response opens with a phrase (after whitespace); substring: anywhere."
    )
    prefix_window: PositiveInt = Field(
        80, description="prefix mode: a phrase must start within the first N characters."
    )
    model: str | None = Field(None, description="classifier: a hub id or local path of a sequence classifier.")
    refusal_labels: list[str] = Field(
        default_factory=lambda: ["refusal", "safe", "LABEL_1"],
        description="classifier: labels that count as a refusal.",
    )
    classifier_input: Literal["response", "prompt_response"] = Field(
        "response", description="classifier: classify the response alone or the (prompt, response) pair."
    )

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if self.kind == "classifier" and not self.model:
            raise ValueError("kind 'classifier' needs `model` (a hub id or local path)")
        if isinstance(self.phrases, list) and (not self.phrases or any(not p.strip() for p in self.phrases)):
            raise ValueError("`phrases` must be a list name or a non-empty list of non-empty phrases")
        if self.kind == "classifier" and not self.refusal_labels:
            raise ValueError("`refusal_labels` must not be empty")
        return self


class TaskEvalConfig(DataConfig):
    """A task's held-out set, scored after its own stage and after every later one."""

    split: str = "test"
    limit: PositiveInt | None = 32
    metric: Literal["exact_match", "label_accuracy", "choice", "pass_at_k", "harness", "nll"] = Field(
        "exact_match",
        description="exact_match: last number in the response equals the answer; "
        "label_accuracy: first label word in the response equals the answer; "
        "choice: multiple choice by log-likelihood of each label's response, no generation (the harness's acc); "
        "pass_at_k: the generated code passes the task's tests (greedy pass@1; needs allow_code_execution); "
        "harness: lm-evaluation-harness scores it with the template named by `harness` (safecl.evaluation.harness); "
        "nll: only the gold-answer NLL (column nll:<task>, lower is better).",
    )
    harness: Literal["gsm8k", "boolq", "arc_easy"] | None = Field(
        None, description="metric harness: the harness task template run over this eval's examples (local, offline); "
        "boolq / arc_easy: multiple choice by log-likelihood (acc) over the labels.")
    gold_nll: bool | None = Field(
        None, description="Also score the gold-answer NLL (column nll:<task>: mean NLL per gold-response token, "
        "teacher-forced, one forward pass, no generation). Default: when every eval row has a gold response.")
    nll_max_len: PositiveInt = Field(1024, description="gold_nll: tokens per scored sequence (prompt + response).")
    nll_data: DataConfig | None = Field(
        None, description="Score the gold-answer NLL on these rows (with responses) instead of the eval's own, e.g. "
        "held-out rows of the stage's training source (same `seed`, `skip` = the stage's `limit`) when the eval set "
        "has no gold responses (HumanEval).")
    labels: list[str] | None = Field(None, description="label_accuracy / choice: the label words (default: the "
                                     "preset's, else the answers seen).")
    max_new_tokens: PositiveInt | None = Field(None, description="Override retention.max_new_tokens for this task.")
    allow_code_execution: bool = Field(
        False, description="pass_at_k: run the generated code (each sample in its own sandboxed process, see "
        "safecl.evaluation.execution). Off by default: generated code is untrusted."
    )
    sandbox: Literal["bubblewrap", "process"] = Field(
        "bubblewrap", description="pass_at_k: where each sample runs (safecl.evaluation.sandbox). bubblewrap: its own "
        "namespaces, read-only /usr, a tmpfs as its only writable folder, uid 65534, no network, no fork or exec "
        f"(needs `{INSTALL}`); process: the weaker guard of a plain process, which code written to escape gets "
        "around; asked for by name only.")
    timeout: PositiveFloat = Field(10.0, description="pass_at_k: wall-clock seconds per sample.")
    samples: PositiveInt = Field(1, description="pass_at_k: answers per problem; 1 = greedy, more = sampled (the "
                                 "model's generation config, seeded by the check) for the unbiased pass@k.")
    k: PositiveInt = Field(1, description="pass_at_k: the k of pass@k (<= samples).")

    @model_validator(mode="after")
    def _code_opt_in(self) -> "TaskEvalConfig":
        if (self.metric == "harness") != (self.harness is not None):
            raise ValueError("metric harness and the `harness` template go together (e.g. metric: harness, "
                             "harness: gsm8k)")
        if self.k > self.samples:
            raise ValueError(f"pass@{self.k} needs at least {self.k} samples per problem (samples: {self.samples})")
        if self.metric == "pass_at_k" and not self.allow_code_execution:
            raise ValueError("metric pass_at_k runs the model's generated code; set allow_code_execution: true "
                             "in this eval section to allow it (each sample runs in its own sandboxed process)")
        if self.metric == "pass_at_k" and self.sandbox == "bubblewrap":
            problem = bubblewrap_problem()
            if problem is not None:  # never a silent fallback to the weaker guard
                raise ValueError(f"sandbox: bubblewrap (the default for code execution): {problem}. Install it "
                                 f"(`{INSTALL}`), or set `sandbox: process` in this eval section to run the samples "
                                 "under the weaker process guard (no boundary against code written to escape)")
        return self

    @classmethod
    def preset_defaults(cls, preset, data: dict) -> dict:
        """A preset's default ``metric`` and ``labels`` (a key the recipe sets wins), then DataConfig's."""
        if preset.metric is None:
            raise ValueError(f"preset {preset.name!r} has no gold answers, so it cannot score a task; "
                             "use it as stage data only")
        data.setdefault("metric", preset.metric)
        label_based = data["metric"] in ("label_accuracy", "choice") or data.get("harness") in ("boolq", "arc_easy")
        if label_based and data.get("labels") is None and preset.labels:
            data["labels"] = list(preset.labels)
        return super().preset_defaults(preset, data)


class ProbeConfig(Section):
    """The refusal probe (safecl.safety.probe): probe retention measured during task stages on
    held-in harmful prompts, a few greedy tokens each (``opening``) or one forward pass (the other
    kinds), never a full generation. Needs ``refusal_direction`` (its harmful prompts are probed)."""

    kind: Literal["direction", "prefix", "prefix-prob", "opening"] = Field(
        "opening", description="What is read (safecl.safety.probe): opening (the default) = the share of prompts "
        "whose greedy first `tokens` tokens open a refusal by the judge's phrase list; direction = the last prompt "
        "token's projection on the refusal direction; prefix = the mean per-token log-probability of each prompt's "
        "post-safety refusal opening (its first `tokens` answer tokens, teacher-forced); prefix-prob = the "
        "probability of that whole opening. Each is 0 on the base model and 1 after the safety stage. `opening` "
        "is the default because its measured Spearman with the judged check is the highest and the only one >= 0.9 "
        "(safecl.safety.config.MEASURED_SPEARMAN; the intervals overlap); it needs "
        "the keyword judge.")
    every: PositiveInt = Field(25, description="Optimizer steps between two probes (plus one before the first step "
                               "and one at the stage end).")
    limit: PositiveInt = Field(64, description="Harmful prompts probed: the first N of refusal_direction.harmful. "
                               "The reading is a share of them, so fewer prompts read coarser steps (the correlation "
                               "with the judge was measured at 64; at 32 the quickstart's last reading missed the "
                               "judged retention by 0.37).")
    tokens: PositiveInt = Field(6, description="prefix, prefix-prob, opening: answer tokens read per prompt "
                                "(the recorded opening's length; the greedy steps of `opening`).")
    batch_size: PositiveInt = Field(64, description="Probe prompts decoded together (64 prompts: 2.50 s per call "
                                    "at 64, 3.27 s at 16, SmolLM2-135M on 2 CPU cores).")
    keep_adapters: bool = Field(
        False, description="Keep the cumulative adapter at every probed step in <stage dir>/probe_adapters/"
        "step-NNNNNN/ (PEFT format), so benchmarks/probe_correlation.py can judge mid-stage checkpoints. "
        "One adapter per probe: mind the disk.")


class RetentionConfig(Section):
    """The safety-retention check run on the base model and after every stage."""

    enabled: bool = True
    harmful: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(source="builtin:harmful-eval"))
    benign: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(source="builtin:benign-eval"))
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    max_new_tokens: PositiveInt = 32
    batch_size: PositiveInt = Field(
        64, description="Prompts decoded together. Greedy answers do not depend on it (safecl.evaluation.decoding); "
        "larger batches cost less per prompt until memory runs out.")
    do_sample: bool = False
    bootstrap_samples: PositiveInt = 1000
    stop_when_judged: bool = Field(
        True,
        description="Stop generating a response once the judge's verdict (or a task's first label) "
        "cannot change; stored responses are then cut there.",
    )
    check_base: bool = Field(True, description="Also check the base model before any stage (row 0).")
    score_all_tasks: bool = Field(
        True, description="Score every task of the recipe at every check (the base model and before each task's "
        "own stage too), so each stage's gain and forward transfer are measured; false: only the tasks seen so far "
        "(cheaper checks).")
    probe: ProbeConfig | None = Field(
        None, description="Watch probe retention during task stages (needs `refusal_direction`); see gate.watch."
    )


class GateConfig(Section):
    """When a stage forgot too much: thresholds and what to do.

    retention(t) = refusal(t) / refusal(safety stage); drop(t) = refusal(safety) - refusal(t).
    A threshold left null is not checked.
    """

    min_retention: Fraction | None = None  # type: ignore[valid-type]
    max_drop: Fraction | None = None  # type: ignore[valid-type]
    max_over_refusal: Fraction | None = None  # type: ignore[valid-type]
    action: Literal["warn", "halt", "rollback", "repair"] = Field(
        "warn", description="warn: go on; halt: stop (exit 3); rollback: restore the previous adapter; repair: "
        "train short safety passes on free entries (gate.repair) and re-check, exit 3 if they do not suffice."
    )
    after_rollback: Literal["continue", "stop"] = "continue"
    watch: Literal["probe"] | None = Field(
        None, description="probe: act mid-stage when probe retention falls below `min_probe_retention` "
        "(needs retention.probe)."
    )
    min_probe_retention: float | None = Field(
        None, description="Probe retention (0 = base model, 1 = after the safety stage) under which `watch` acts."
    )
    watch_untracked: bool = Field(
        False, description="Let `watch` act on a probe kind not measured to track the judged check (Spearman < 0.9, "
        "safecl.safety.config.MEASURED_SPEARMAN): the probe alone then stops or rolls back stages. Off: such a "
        "recipe is refused, since a watcher that errs toward 'safe' lets the stages it exists to stop run to the end.")
    watch_action: Literal["halt", "rollback"] = Field(
        "halt", description="halt: stop the stage there, commit it, exit 3; rollback: restore the last probed "
        "step at or above the threshold, end the stage there and go on."
    )
    repair: RepairConfig = Field(default_factory=RepairConfig)
