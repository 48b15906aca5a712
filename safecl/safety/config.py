"""Recipe sections of the mechanisms that keep the safety alignment through task stages.

Each is a key of a task stage (``stages.N.replay``, ``stages.N.anchor``, ``stages.N.merge``)
or of the recipe (``refusal_direction``); their math and cost are documented where they act:
:mod:`safecl.data.replay`, :mod:`safecl.safety.anchors`, :mod:`safecl.adapters.conflict`,
:mod:`safecl.safety.direction`.
"""

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, confloat

from safecl.config import Section
from safecl.data.config import DataConfig


class ReplayConfig(Section):
    """Mix rows of an earlier source into a task stage's training data (seeded).

    ``share`` s: replay rows make up s of the stage's mixed data; the task rows are all kept,
    so round(s / (1 - s) * n_task) rows are added. They train inside the stage's own mask.
    """

    share: confloat(gt=0.0, lt=1.0) = Field(description="Share of the mixed training rows drawn from `source`.")  # type: ignore[valid-type]
    source: DataConfig | None = Field(None, description="Where replay rows come from (default: the safety stage's data).")
    distill: NonNegativeFloat = Field(
        0.0, description="Weight of a KL term to the model before the stage on the replay rows' first "
        "`distill_tokens` response tokens (DER-style logit matching); 0 = plain replay."
    )
    distill_tokens: PositiveInt = 16
    distill_batch_size: PositiveInt = 4


class AnchorConfig(Section):
    """A refusal anchor: keep the model's first response tokens on anchor prompts close to the
    model before the stage (its teacher, free: the same model with the stage's part off).

    The anchor prompts' responses are the teacher's own greedy answers, generated once at the
    stage start, so no safety training rows are needed: only prompts. They must not be the
    retention check's prompts (held-out sets judge the result).
    """

    prompts: DataConfig | None = Field(
        None, description="Anchor prompts, harmful and benign mixed (default: the safety stage's data, prompts only)."
    )
    limit: PositiveInt = Field(64, description="Anchor prompts drawn (seeded) from `prompts`.")
    task_share: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of the `limit` anchors chosen as the `prompts` nearest the stage's "
        "own training prompts (mean hidden state of the model before the stage, centred cosine to the task "
        "centroid; safecl/safety/selection.py), the rest drawn at random. 0 = all random. A stage erodes refusal "
        "most where its instructions look like harmful requests (code: 'write a script that...')."
    )
    task_pool: PositiveInt = Field(
        1024, description="task_share > 0: the candidates scored (a seeded sample of `prompts`; all when fewer)."
    )
    loss: Literal["kl", "direction"] = Field(
        "kl", description="kl: KL(teacher || model) over the first `tokens` response tokens; direction: squared "
        "change of the last prompt token's projection onto the refusal direction (needs `refusal_direction`)."
    )
    weight: PositiveFloat = 1.0
    tokens: PositiveInt = Field(16, description="kl: response tokens per anchor where the KL is taken.")
    batch_size: PositiveInt = Field(4, description="Anchor prompts per optimizer step.")
    every: PositiveInt = Field(
        1, description="kl: take the anchor term every N optimizer steps, weighted N times (the same total "
        "weight over the stage for 1/N of the cost; measured for retention in benchmarks/safety_study.py)."
    )
    cache_mb: NonNegativeFloat | None = Field(
        1024, description="kl: memory budget of the teacher cache (the teacher's log-probabilities at every "
        "anchor's labelled positions, computed once per stage: anchors x tokens x vocabulary x 4 bytes). Above it "
        "the teacher is recomputed every step (said in the log); 0 = never cache, null = always."
    )


class DirectionConfig(Section):
    """Where the refusal direction is computed, right after the safety stage (held-in prompts)."""

    harmful: DataConfig = Field(description="Harmful prompts (responses unused).")
    harmless: DataConfig = Field(description="Harmless prompts (responses unused).")
    batch_size: PositiveInt = 8


class SafetyMergeConfig(Section):
    """Post-stage safety merge (data-free): in modules where the stage's update conflicts with the
    safety stage's (cosine of the two weight deltas below ``threshold``), scale the stage's own
    entries by ``scale``. Entries outside the stage's part never move."""

    threshold: float = Field(0.0, ge=-1.0, le=1.0)
    scale: confloat(ge=0.0, le=1.0) = 0.5  # type: ignore[valid-type]


class RepairConfig(Section):
    """Gate action ``repair``: a short safety pass on newly allocated free entries when a stage
    falls below the gate's thresholds, re-checked, up to ``attempts`` times (then exit 3)."""

    attempts: PositiveInt = 2
    steps: PositiveInt = Field(20, description="Optimizer steps of one repair pass.")
    density: confloat(gt=0.0, le=1.0) = Field(  # type: ignore[valid-type]
        0.02, description="lori-s: share of all B entries one repair pass owns (taken from the free ones)."
    )
    lr: PositiveFloat | None = Field(None, description="Learning rate (default: the safety stage's).")
    data: DataConfig | None = Field(None, description="Repair data (default: the safety stage's data).")


# The refusal probe's kinds (safecl.safety.probe) and how well each tracks the judged check.
PROBE_KINDS = ("direction", "prefix", "prefix-prob", "opening")

# Spearman's rho between a kind's probe retention and judged refusal retention over the
# checkpoints of benchmarks/probe_correlation.py (benchmarks/results/probe_kinds.md: 38 distinct
# checkpoints of 16 runs, 12 of them mid-stage judged at n = 128; 95% intervals there);
# None: not measured. A kind under TRACKS_JUDGE_RHO (or unmeasured) does not stop a stage on its
# own (gate.watch; see Recipe validation).
MEASURED_SPEARMAN: dict[str, float | None] = {
    "direction": 0.73,    # [0.47, 0.90]
    "prefix": 0.88,       # [0.72, 0.95]
    "prefix-prob": 0.85,  # [0.65, 0.95]
    "opening": 0.95,      # [0.85, 0.98]
}
TRACKS_JUDGE_RHO = 0.9


def probe_tracks_judge(kind: str) -> bool:
    """The kind's measured Spearman rho with judged retention is at least :data:`TRACKS_JUDGE_RHO`."""
    rho = MEASURED_SPEARMAN.get(kind)
    return rho is not None and rho >= TRACKS_JUDGE_RHO
