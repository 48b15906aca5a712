"""The bottom room: what every config section and every data source needs, importing nothing of safecl.

- :class:`Section`: the strict pydantic base of every recipe section (unknown keys are errors,
  assignments are validated). data/, evaluation/, tracking and recipe/ all build on it, so none
  of them has to import the recipe package.
- :func:`flatten_keys`: a recipe mapping as dotted keys (MLflow params, resume diffs).
- :func:`is_local_source` / :func:`resolve_source`: how a ``source`` string in a recipe names a
  local file and where a relative path resolves (against the recipe's folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".gz", ".txt")


class Section(BaseModel):
    """A recipe section. Unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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
