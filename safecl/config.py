"""The bottom room: what every config section and every data source needs, importing nothing of safecl.

- :class:`Section`: the strict pydantic base of every recipe section (unknown keys are errors,
  assignments are validated). data/, evaluation/, tracking and recipe/ all build on it, so none
  of them has to import the recipe package.
- :func:`flatten_keys`: a recipe mapping as dotted keys (MLflow params, resume diffs).
- :func:`is_local_source` / :func:`resolve_source`: how a ``source`` string in a recipe names a
  local file and where a relative path resolves (against the recipe's folder).
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gz", ".txt")


def _leaves(annotation: Any) -> set:
    """The plain types an annotation admits: ``Annotated[float, ...] | None`` -> {float, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaves(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    return {origin or annotation}


def _wants_a_number(annotation: Any) -> bool:
    """A number field that does not also take a boolean (pydantic would read true as 1)."""
    leaves = _leaves(annotation)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


class Section(BaseModel):
    """A recipe section. Unknown keys are errors; assignments are validated too; a boolean where
    a number belongs is an error (``lr: true`` is not lr 1.0), in a list of numbers too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if field is None:
            return value
        annotation = field.annotation
        if isinstance(value, bool) and _wants_a_number(annotation):
            raise ValueError(f"expected a number, got a boolean ({str(value).lower()})")
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            items = [a for a in _leaves_of_lists(annotation)]
            if items and all(_wants_a_number(a) for a in items):
                raise ValueError(f"expected a list of numbers, got a boolean in {value!r}")
        return value


def _leaves_of_lists(annotation: Any) -> list:
    """The item annotations of the list types an annotation admits (``list[float] | None`` -> [float])."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves_of_lists(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [i for a in typing.get_args(annotation) for i in _leaves_of_lists(a)]
    if origin is list:
        return list(typing.get_args(annotation)[:1])
    return []


def cache_dir() -> Path:
    """safecl's per-user cache: ``$SAFECL_CACHE``, else ``~/.cache/safecl`` (converted models, the
    empty MLflow store template). Everything in it can be deleted; it is built again on demand."""
    return Path(os.environ.get("SAFECL_CACHE", Path.home() / ".cache" / "safecl"))


def is_local_source(source: str) -> bool:
    """True when ``source`` names a local file (a path prefix or a data-file suffix)."""
    return source.startswith(("/", "./", "../", "~")) or source.lower().endswith(LOCAL_SUFFIXES)


def resolve_source(source: str, base_dir: Path) -> Path:
    """A local ``source`` as a path: absolute as given, relative against ``base_dir``."""
    p = Path(source).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def flatten_keys(data: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe mapping as dotted keys: ``{"stages": [{"lr": 1}]}`` -> ``{"stages.0.lr": 1}``.

    Mappings and lists of mappings (the stages) are opened up; any other value, a list of
    scalars included, is one leaf.
    """
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten_keys(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten_keys(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: data}
