"""Reading recipes: YAML with line numbers, command-line overrides, migration, clear errors.

``load_recipe(path, overrides)`` returns a validated :class:`~safecl.recipe.schema.Recipe`
or raises :class:`~safecl.errors.RecipeError` whose message names the file, the YAML line
and the key path at fault (with a did-you-mean hint for unknown keys). Recipes are data:
``yaml.safe_load`` semantics only, nothing is executed.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from safecl.config import is_local_source, resolve_source
from safecl.data.builtin import builtin_names
from safecl.errors import RecipeError
from safecl.recipe.schema import CURRENT_VERSION, Recipe

# version -> function(raw dict) -> raw dict of version + 1. Add one per format change.
MIGRATIONS: dict[int, typing.Callable[[dict], dict]] = {}


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path (('stages', 0, 'lr')) to its 1-based YAML line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            out[key_path] = key_node.start_mark.line + 1
            _line_map(value_node, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``stages.1.epochs=2`` -> (['stages', 1, 'epochs'], 2). The value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not KEY=VALUE (example: train.lr=1e-4 stages.1.epochs=2)")
    key, _, raw = text.partition("=")
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_override(raw: dict, parts: list[str | int], value: Any, text: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(map(str, parts[: i + 1]))
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"override {text!r}: {where} is not an index of a list of {len(node)}")
            node = node[part]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(f"override {text!r}: {where} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"override {text!r}: index {last} out of range (list of {len(node)})")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"override {text!r}: parent is not a section")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking ``loc`` from Recipe (for did-you-mean)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """list[X] / X | None / Union -> the BaseModel inside, if any."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _format_errors(exc: ValidationError, path: Path, lines: dict, overridden: dict) -> str:
    msgs = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("function-after",)))
        key = ".".join(map(str, loc)) or "(top level)"
        where = _where(path, lines, overridden, loc)
        if err["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            hint = ""
            if model is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
                hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?" if close else (
                    f"; allowed keys: {', '.join(model.model_fields)}"
                )
            msgs.append(f"{where}: unknown key {key!r}{hint}")
        elif err["type"] == "missing":
            msgs.append(f"{where}: missing required key {key!r}")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
            msgs.append(f"{where}: {key}: {err['msg']}{got_s}")
    return "\n".join(msgs)


def _where(path: Path, lines: dict, overridden: dict, loc: tuple) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in overridden:
            return f"{path} (command-line override {overridden[loc[:n]]})"
        if loc[:n] in lines:
            return f"{path}:{lines[loc[:n]]}"
    return str(path)


def load_raw(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (key: value), got {type(raw).__name__}")
    return raw, (_line_map(node) if node is not None else {})


def migrate(raw: dict, path: Path) -> dict:
    version = raw.get("version", CURRENT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise RecipeError(f"{path}: version must be a positive integer, got {version!r}")
    if version > CURRENT_VERSION:
        raise RecipeError(
            f"{path}: recipe version {version} is newer than this safecl understands ({CURRENT_VERSION}); upgrade safecl"
        )
    while version < CURRENT_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
        raw["version"] = version
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Recipe:
    """Load, override, migrate and validate a recipe; optionally check that data files exist."""
    path = Path(path)
    raw, lines = load_raw(path)
    overridden: dict[tuple, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value, text)
        overridden[tuple(parts)] = text
    raw = migrate(raw, path)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, path, lines, overridden)) from None
    if check_files:
        check_sources(recipe, path, lines, overridden)
    return recipe


def recipe_dir(path: str | Path) -> Path:
    return Path(path).resolve().parent


def _sources(recipe: Recipe):
    for i, stage in enumerate(recipe.stages):
        yield ("stages", i, "data", "source"), stage.data.source
        if stage.data.safety_source is not None:
            yield ("stages", i, "data", "safety_source"), stage.data.safety_source
        if stage.eval is not None:
            yield ("stages", i, "eval", "source"), stage.eval.source
    if recipe.retention.enabled:
        yield ("retention", "harmful", "source"), recipe.retention.harmful.source
        yield ("retention", "benign", "source"), recipe.retention.benign.source


def check_sources(recipe: Recipe, path: Path, lines: dict | None = None, overridden: dict | None = None) -> None:
    """Every local data file exists and every builtin name is known (errors name key and line).

    A preset's ``source`` (and Saferpaca's ``safety_source``) is checked like any other; a
    preset left on its default hub id is not (the hub is reached only when the data loads).
    """
    lines, overridden = lines or {}, overridden or {}
    base = recipe_dir(path)
    problems = []
    known = builtin_names()
    for loc, source in _sources(recipe):
        where = _where(path, lines, overridden, loc)
        key = ".".join(map(str, loc))
        if source.startswith("builtin:"):
            if source[len("builtin:"):] not in known:
                problems.append(f"{where}: {key}: unknown built-in set {source!r}; known: {', '.join(known)}")
        elif is_local_source(source) and not resolve_source(source, base).exists():
            problems.append(f"{where}: {key}: file not found: {resolve_source(source, base)}")
    if problems:
        raise RecipeError("\n".join(problems))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
