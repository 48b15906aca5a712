"""Reading records from built-in sets, local files (JSON, JSONL, CSV, Parquet) and the hub,
and turning each row into an :class:`~safecl.data.records.Example`.

This module is safecl's one reader of rows: training data here, prompt sets through
:func:`read_table` (:mod:`safecl.evaluation.prompts`). Files are UTF-8 (a byte-order mark is
dropped) and may be gzip-compressed (``.gz``); CSV headers are stripped of spaces; a JSON file
is a list of rows, or an object holding an ``instructions`` list or exactly one list.

Row forms:
- instruction: ``{instruction, input, output}`` (Alpaca, Saferpaca); the user turn is
  ``instruction`` followed by a blank line and ``input`` when ``input`` is not empty.
- chat: ``{messages: [{role, content}, ...]}``.
Column names are remapped with ``fields``; with a ``preset`` the preset's ``to_row`` turns
each raw row into the instruction form instead (:mod:`safecl.data.presets`). A malformed
row is a DataError naming the file and the row (1-based), or is skipped and counted when
``on_bad_record: skip``. The hub (``datasets``) is touched only for a source that is neither
built-in nor a local path.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safecl.config import is_local_source, resolve_source
from safecl.data.builtin import builtin_path
from safecl.data.config import DataConfig
from safecl.data.presets import DATA_PRESETS, mix_saferpaca
from safecl.data.records import Example
from safecl.errors import DataError

ROLES = {"system", "user", "assistant"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # what a hub dataset id can look like: name or org/name
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

By = Literal["row", "line"]


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    duplicates: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    preset: str | None = None
    parts: dict[str, dict] = field(default_factory=dict)  # saferpaca: {"alpaca"|"safety": {rows, kept, ...}}

    def to_dict(self) -> dict:
        out = {"source": self.source, "rows": self.rows, "kept": self.kept, "skipped": self.skipped,
               "duplicates": self.duplicates, "skip_reasons": self.skip_reasons[:10]}
        if self.preset is not None:
            out["preset"] = self.preset
        if self.parts:
            out["parts"] = self.parts
        return out


@dataclass
class Table:
    """The raw rows of one source and where each stands, for messages that name file and row.

    ``name`` is the source as messages call it (the file path, ``builtin:<name>`` or the hub
    id); ``kind`` is what was read (jsonl, json, csv, parquet or hub); ``lines`` holds each
    row's 1-based line in a text file (JSONL, CSV), None where rows have no line (JSON,
    Parquet, hub). ``by`` is how :meth:`where` names a row: ``"row"``, ``data.jsonl: row 3``
    (1-based, counting rows); ``"line"``, ``prompts.csv:4`` (the file line) or
    ``prompts.json[2]`` (0-based index) where there is no line.
    """

    name: str
    kind: str
    rows: list
    lines: list[int] | None = None
    by: By = "row"

    def where(self, i: int) -> str:
        """Where row ``i`` (0-based) stands."""
        return _where(self.name, self.by, i, self.lines[i] if self.lines else None)


def _where(name: str, by: By, index: int | None, line: int | None = None) -> str:
    if by == "line" and line is not None:
        return f"{name}:{line}"
    if index is None:
        return f"{name}: line {line}"
    return f"{name}[{index}]" if by == "line" else f"{name}: row {index + 1}"


def read_table(source: str, split: str = "train", base_dir: Path | None = None, *, hub_config: str | None = None,
               hub: bool = True, what: str = "data", by: By = "row") -> Table:
    """The rows of a source: ``builtin:<name>`` (its ``split``), a local file (relative paths
    resolve against ``base_dir``, default the working folder) or a hub dataset id (``split``,
    ``hub_config``). With ``hub=False`` a source that is not a file is a missing file;
    ``what`` names the kind of file in that message ("data file not found", "prompt file ...").
    """
    if source.startswith("builtin:"):
        try:
            path = builtin_path(source[len("builtin:"):], split)
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
        return _read_file(path, source, by)
    base = base_dir if base_dir is not None else Path.cwd()
    path = resolve_source(source, base)
    if path.is_file():
        return _read_file(path, str(path), by)
    if not hub or is_local_source(source) or not HUB_ID.match(source):
        relative = "" if Path(source).expanduser().is_absolute() else f", relative to {base}"
        raise DataError(f"{what} file not found: {path} (source {source!r}{relative})")
    return Table(source, "hub", _read_hub(source, split, hub_config), by=by)


def _open(path: Path):
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="")


def _read_file(path: Path, name: str, by: By) -> Table:
    kind = FILE_TYPES.get(Path(path.name.lower().removesuffix(".gz")).suffix)
    if kind is None:
        raise DataError(f"{name}: unknown file type (use .json, .jsonl, .csv or .parquet, optionally .gz)")
    if kind == "parquet":
        import pyarrow.parquet as pq

        return Table(name, kind, pq.read_table(path).to_pylist(), by=by)
    try:
        with _open(path) as fh:
            return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind](fh, name, by)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(fh, name: str, by: By) -> Table:
    rows, lines = [], []
    for line_no, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{_where(name, by, len(rows), line_no)}: not valid JSON: {exc.msg}") from None
        lines.append(line_no)
    return Table(name, "jsonl", rows, lines, by)


def _read_json(fh, name: str, by: By) -> Table:
    try:
        data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{_where(name, by, None, exc.lineno)}: not valid JSON: {exc.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if isinstance(data.get("instructions"), list):
            data = data["instructions"]
        elif len(lists) == 1:
            data = lists[0]
        else:
            raise DataError(f"{name}: a JSON object must hold an 'instructions' list or exactly one list of rows; "
                            f"keys are {sorted(data)}")
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of rows, got {type(data).__name__}")
    return Table(name, "json", data, None, by)


def _read_csv(fh, name: str, by: By) -> Table:
    rows, lines = [], []
    try:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{name}: empty CSV (no header row)")
        reader.fieldnames = [h.strip() for h in reader.fieldnames]
        for row in reader:
            rows.append({k: v for k, v in row.items() if k is not None})
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{name}: not a readable CSV file: {exc}") from None
    return Table(name, "csv", rows, lines, by)


def _read_hub(source: str, split: str, config: str | None = None) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(source, config, split=split))
    except Exception as exc:  # datasets raises many kinds; all mean "cannot load this id"
        raise DataError(
            f"cannot load dataset {source!r} (split {split!r}) from the hub: {str(exc).splitlines()[0]}. "
            "Offline? Use a local file path instead."
        ) from None


def row_to_example(row: dict, cfg: DataConfig, origin: str, need_response: bool = True) -> Example:
    """One row -> Example; raises ValueError with the reason when the row is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    f = cfg.fields
    fmt = cfg.format
    if fmt == "auto":
        fmt = "chat" if f.messages in row else "instruction"
    system = row.get(f.system) if f.system else None
    system = system or cfg.system_prompt
    answer = row.get(f.answer)
    if fmt == "chat":
        msgs = row.get(f.messages)
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"field {f.messages!r} must be a non-empty list of messages")
        messages = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{f.messages}[{j}] must be {{role: system|user|assistant, content: str}}")
            messages.append({"role": m["role"], "content": m["content"]})
        if need_response and messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (it carries the loss)")
    else:
        instr = row.get(f.instruction)
        if not isinstance(instr, str) or not instr.strip():
            raise ValueError(f"field {f.instruction!r} is missing or not a non-empty string")
        extra = row.get(f.input) or ""
        if not isinstance(extra, str):
            raise ValueError(f"field {f.input!r} must be a string")
        user = instr.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        messages = [{"role": "user", "content": user}]
        out = row.get(f.output)
        if need_response and (not isinstance(out, str) or not out.strip()):
            raise ValueError(f"field {f.output!r} is missing or not a non-empty string")
        if isinstance(out, str) and out.strip():  # kept when optional too: the gold response of an eval set
            messages.append({"role": "assistant", "content": out.strip()})
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}  # a preset's extra fields (humaneval)
    return Example(messages=messages, answer=None if answer is None else str(answer), origin=origin, meta=meta)


def _numbered(table: Table) -> list[tuple[str, object]]:
    return [(table.where(i), row) for i, row in enumerate(table.rows)]


def read_records(cfg: DataConfig, base_dir: Path | None = None,
                 seed: int = 0) -> tuple[str, list[tuple[str, str | None, object]], dict[str, dict]]:
    """(display name, [(origin, part, raw row)], parts) of a data config.

    ``part`` is None except for a Saferpaca mix ("alpaca" or "safety"), whose rows are
    interleaved with ``seed`` (:func:`~safecl.data.presets.mix_saferpaca`); ``parts`` then
    counts the rows of each part.
    """
    preset = DATA_PRESETS.get(cfg.preset) if cfg.preset else None
    hub_config, split = None, cfg.split
    if preset is not None and cfg.source == preset.hub:
        hub_config, split = preset.hub_config, preset.hub_splits.get(cfg.split, cfg.split)
    table = read_table(cfg.source, split, base_dir, hub_config=hub_config)
    name = table.name
    if cfg.safety_source is None:
        return name, [(origin, None, row) for origin, row in _numbered(table)], {}
    safety = read_table(cfg.safety_source, cfg.split, base_dir)
    safety_name = safety.name
    n = cfg.safety_rows if cfg.safety_rows is not None else len(safety.rows)
    try:
        mixed = mix_saferpaca(_numbered(table), _numbered(safety), n, seed)
    except ValueError as exc:
        raise DataError(f"{safety_name}: {exc}") from None
    parts = {"alpaca": {"source": name, "rows": len(table.rows)},
             "safety": {"source": safety_name, "rows": n, "available": len(safety.rows)}}
    return f"saferpaca({name} + {n} rows of {safety_name})", [(o, part, r) for part, (o, r) in mixed], parts


def load_examples(cfg: DataConfig, base_dir: Path | None = None, seed: int = 0,
                  need_response: bool = True) -> tuple[list[Example], LoadReport]:
    """All usable examples of a source (shuffled with ``seed``, or the source's own ``seed``, if
    asked, then the first ``skip`` dropped and the rest cut to ``limit``).

    A preset's rows go through its ``to_row`` first; a Saferpaca mix is interleaved with
    ``seed`` whatever ``shuffle`` says, so ``limit`` keeps its safety share.
    """
    seed = cfg.seed if cfg.seed is not None else seed
    name, rows, parts = read_records(cfg, base_dir, seed)
    to_row = DATA_PRESETS[cfg.preset].to_row if cfg.preset else None
    report = LoadReport(source=name, rows=len(rows), preset=cfg.preset, parts=parts)
    if not rows:
        raise DataError(f"{name}: no usable rows: the data set is empty")
    examples, seen = [], set()
    if cfg.where:
        rows = [(o, p, r) for o, p, r in rows if all(r.get(k) == v for k, v in cfg.where.items())]
        if not rows:
            raise DataError(f"{name}: no row matches where: {cfg.where}")
    for origin, part, row in rows:
        try:
            ex = row_to_example(to_row(row) if to_row else row, cfg, origin, need_response)
            if part is not None:
                ex.meta["part"] = part
        except ValueError as exc:
            if cfg.on_bad_record == "error":
                raise DataError(f"{origin}: {exc} (set on_bad_record: skip to drop such rows)") from None
            report.skipped += 1
            report.skip_reasons.append(f"{origin}: {exc}")
            continue
        key = json.dumps(ex.messages, sort_keys=True)
        if key in seen:
            report.duplicates += 1
        seen.add(key)
        examples.append(ex)
    if not examples:
        raise DataError(f"{name}: no usable rows ({report.rows} rows, {report.skipped} skipped)")
    if cfg.shuffle:
        random.Random(seed).shuffle(examples)
    if cfg.skip:
        if cfg.skip >= len(examples):
            raise DataError(f"{name}: skip: {cfg.skip} leaves no row of its {len(examples)} usable ones")
        examples = examples[cfg.skip:]
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    report.kept = len(examples)
    for part, counts in parts.items():
        counts["kept"] = sum(ex.meta.get("part") == part for ex in examples)
    return examples, report
