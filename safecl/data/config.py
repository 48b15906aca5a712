"""Recipe sections that name data: where records come from and how their fields map."""

from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from safecl.config import Section
from safecl.data.presets import (DATA_PRESET_NAMES, DATA_PRESETS, SAFERPACA_SAFETY_ROWS, fill_hub_source,
                                 preset_named)


class FieldMap(Section):
    """Column names of a source, for data that does not use the Alpaca/chat names."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    answer: str = "answer"
    system: str | None = Field(None, description="Column with a per-row system prompt, if any.")


class PresetSection(Section):
    """A section with a ``preset`` key: the named public set fills in what the recipe leaves out.

    A subclass names its registry in ``presets`` and fills the raw mapping in
    :meth:`preset_defaults` (a ValueError there is a recipe error).
    """

    presets: ClassVar[dict] = {}

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data):
        preset = preset_named(data, cls.presets)
        return data if preset is None else cls.preset_defaults(preset, dict(data))

    @classmethod
    def preset_defaults(cls, preset, data: dict) -> dict:
        return data


class DataConfig(PresetSection):
    """One data source for a stage.

    ``source`` is ``builtin:<name>`` (the project's own sets, see ``safecl data list``), a
    local file (.json, .jsonl, .csv, .parquet; relative paths resolve against the recipe's
    folder) or a Hugging Face dataset id (loaded through ``datasets``).

    ``preset`` names a public data set (:mod:`safecl.data.presets`): the preset maps its
    columns (so ``fields`` and ``format`` stay unset) and ``source`` is where its file lies,
    or is left out for the preset's default hub id. ``preset: saferpaca`` mixes ``source``
    (Alpaca rows) with ``safety_rows`` rows of ``safety_source``; with no ``safety_source``,
    ``source`` is an already mixed Saferpaca file.
    """

    preset: Literal[DATA_PRESET_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="A public data set by name (see `safecl data list`); `source` then overrides its location."
    )
    source: str = Field(description="builtin:<name>, a local file, or a hub dataset id (optional with a preset "
                        "that has a default hub id).")
    split: str = Field("train", description="Split for builtin and hub sources.")
    format: Literal["auto", "instruction", "chat"] = Field(
        "auto", description="instruction = {instruction, input, output}; chat = {messages}."
    )
    fields: FieldMap = Field(default_factory=FieldMap)
    system_prompt: str | None = Field(None, description="System message put before every example.")
    limit: PositiveInt | None = Field(None, description="Use only the first N records (after shuffling).")
    shuffle: bool = Field(False, description="Shuffle with the recipe seed before taking `limit`.")
    skip: NonNegativeInt = Field(0, description="Drop the first N records (after shuffling, before `limit`): with "
                                 "the same `seed`, `skip: N` holds out what `limit: N` trains on.")
    seed: int | None = Field(None, description="Shuffle seed (default: one derived from the recipe seed and the "
                             "place the data is read for); set it on a training set and its held-out eval alike.")
    where: dict[str, str | int | float | bool] | None = Field(
        None, description="Keep only rows whose fields equal these values, e.g. {kind: harmful} (before shuffle "
        "and limit)."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop naming file and row; skip: drop and count it."
    )
    safety_source: str | None = Field(
        None, description="preset saferpaca: the safety-only file (safety_only_data_Instructions.json) mixed into "
        "`source` (Alpaca rows)."
    )
    safety_rows: PositiveInt | None = Field(
        None, description=f"preset saferpaca: safety rows drawn (seeded) from safety_source "
        f"(default {SAFERPACA_SAFETY_ROWS}, as saferpaca_Instructions_{SAFERPACA_SAFETY_ROWS}.json)."
    )

    presets: ClassVar[dict] = DATA_PRESETS

    @classmethod
    def preset_defaults(cls, preset, data: dict) -> dict:
        """Fill ``source`` with the preset's hub id and ``safety_rows`` with its default."""
        data, _ = fill_hub_source(preset, data)
        if preset.name == "saferpaca" and data.get("safety_source") and data.get("safety_rows") is None:
            data["safety_rows"] = SAFERPACA_SAFETY_ROWS
        return data

    @model_validator(mode="after")
    def _check_preset(self) -> "DataConfig":
        saferpaca = self.preset == "saferpaca"
        if not saferpaca and (self.safety_source is not None or self.safety_rows is not None):
            raise ValueError("`safety_source` and `safety_rows` apply only to `preset: saferpaca`")
        if saferpaca and self.safety_rows is not None and self.safety_source is None:
            raise ValueError("`safety_rows` needs `safety_source` (the safety-only file to draw them from)")
        if self.preset is not None:
            manual = [k for k, changed in (("fields", self.fields != FieldMap()), ("format", self.format != "auto"))
                      if changed]
            if manual:
                raise ValueError(f"`{'`, `'.join(manual)}` cannot be combined with `preset` (the preset maps the "
                                 "columns); drop the preset to map them yourself")
        return self
