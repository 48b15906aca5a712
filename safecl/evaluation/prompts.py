"""Prompt sets for the retention check: a :class:`PromptSetConfig` -> a list of prompt strings.

Sources and the column each format reads (``field`` overrides it):

================  =======================================  ==========================
format            file                                     prompt column
================  =======================================  ==========================
builtin           ``builtin:<name>`` (JSONL in the package)  ``prompt``
advbench          CSV (AdvBench harmful_behaviors.csv)     ``goal``
xstest            CSV (XSTest xstest_prompts.csv)          ``prompt`` (+ ``label`` filter)
hexphi            JSONL                                    ``instruction``
instructions      JSON list of strings, or {"instructions": [...]}
auto              guessed from the file: CSV with ``goal`` -> advbench, CSV with ``prompt``
                  -> xstest, JSONL/JSON rows -> the first of prompt/instruction/goal present,
                  JSON list of strings / {"instructions"} -> instructions
hub id            ``org/name`` that is not a local file: ``datasets.load_dataset(id, split)``;
                  the column is guessed as for JSONL rows
================  =======================================  ==========================

Every file is read by :func:`safecl.data.sources.read_table` (the one reader of rows: gzip,
a byte-order mark and CSV header spaces are handled there); this module picks the column,
filters and cuts. The file's type comes from its suffix; ``format`` names the column.

A ``preset`` (:data:`safecl.data.presets.PROMPT_PRESETS`) sets ``format`` and ``label`` in the
config; when its ``source`` is the preset's default hub id the hub rows are read with the
column guess above (the hub copies use ``prompt``).

``label`` keeps only rows whose ``label`` column equals it (XSTest: "safe" rows are the
benign prompts a calibrated model answers). ``limit`` keeps the first N prompts after the
filter, in file order, or with ``sample: true`` N prompts drawn by ``random.Random(0)``
(kept in file order; the same N prompts whatever the recipe seed). Every row is still
checked. Relative paths resolve against ``base_dir`` (the recipe's folder).

Raises :class:`DataError` naming the file and the row (``file:line``, or ``file[index]`` in a
JSON list) or column for a missing file, bad JSON, a missing column, an empty or non-string
prompt, or a set left empty.
"""

from __future__ import annotations

import random
from pathlib import Path

from safecl.data.presets import PROMPT_PRESETS
from safecl.data.sources import Table, read_table
from safecl.errors import DataError
from safecl.evaluation.config import PromptSetConfig

_DEFAULT_FIELD = {"builtin": "prompt", "advbench": "goal", "xstest": "prompt", "hexphi": "instruction"}
_GUESS_FIELDS = ("prompt", "instruction", "goal")


def load_prompts(cfg: PromptSetConfig, base_dir: str | Path | None = None) -> list[str]:
    """The prompts of a prompt set, filtered by ``label`` and cut to ``limit``."""
    fmt, table = _read(cfg, Path(base_dir) if base_dir is not None else Path.cwd())
    where = table.name
    for i, row in enumerate(table.rows):
        if not isinstance(row, (dict, str)) or (fmt == "instructions" and not isinstance(row, str)):
            wanted = "a string" if fmt == "instructions" else "a string or an object"
            raise DataError(f"{table.where(i)}: expected {wanted}, got {type(row).__name__}")
    prompts: list[str] = []
    for i, row in enumerate(table.rows):
        loc = table.where(i)
        if isinstance(row, dict):
            if cfg.label is not None:
                if "label" not in row:
                    raise DataError(f"{loc}: `label: {cfg.label}` needs a 'label' column; row has {sorted(row)}")
                if str(row["label"]).strip().lower() != cfg.label:
                    continue
            field = cfg.field or _DEFAULT_FIELD.get(fmt) or next((f for f in _GUESS_FIELDS if f in row), None)
            if field is None or field not in row:
                wanted = field or " / ".join(_GUESS_FIELDS)
                raise DataError(f"{loc}: no column {wanted!r}; columns are {sorted(row)} (set `field`)")
            text = row[field]
        else:
            if cfg.label is not None:
                raise DataError(f"{where}: `label: {cfg.label}` needs rows with a 'label' column")
            text = row
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{loc}: the prompt is empty or not a string: {text!r}")
        prompts.append(text)
        if cfg.limit is not None and not cfg.sample and len(prompts) >= cfg.limit:
            break
    if not prompts:
        extra = f" with label {cfg.label!r}" if cfg.label else ""
        raise DataError(f"{where}: no prompts{extra}")
    if cfg.sample and cfg.limit is not None and len(prompts) > cfg.limit:
        keep = sorted(random.Random(0).sample(range(len(prompts)), cfg.limit))
        prompts = [prompts[i] for i in keep]
    return prompts


def _read(cfg: PromptSetConfig, base_dir: Path) -> tuple[str, Table]:
    """(format, rows) of a prompt set; a hub id is read only in ``auto`` format or as its preset's default."""
    source = cfg.source.strip()
    if source.startswith("builtin:"):
        if cfg.format not in ("auto", "builtin"):
            raise DataError(f"{source}: format {cfg.format!r} does not apply to a built-in set")
        return "builtin", read_table(source, cfg.split, by="line")
    if cfg.format == "builtin":
        raise DataError(f"format 'builtin' needs a source 'builtin:<name>', got {source!r}")
    preset = PROMPT_PRESETS.get(cfg.preset) if cfg.preset else None
    preset_hub = preset is not None and preset.hub is not None and source == preset.hub
    table = read_table(source, cfg.split, base_dir, hub=cfg.format == "auto" or preset_hub, what="prompt", by="line")
    if table.kind == "hub":
        return "hub", table
    return (cfg.format if cfg.format != "auto" else _guess(table)), table


def _guess(table: Table) -> str:
    """A CSV's format from its header (``goal`` -> advbench, ``prompt`` -> xstest); other rows
    have their column guessed row by row."""
    if table.kind == "csv" and table.rows:
        header = table.rows[0]
        if "goal" in header:
            return "advbench"
        if "prompt" in header:
            return "xstest"
    return table.kind
