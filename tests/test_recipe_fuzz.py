"""Recipe fuzzing (property-based, hypothesis): every shipped recipe, damaged at random, through
``safecl validate``.

A damage is one to three of: a key (or a whole section, or a list item) deleted; a value
swapped for one of another type; a value pushed to an extreme (0, -1, 10**30, 1e308, inf, nan,
"", a 10 000-character string). Whatever the damage, ``safecl validate`` exits 0 (still a good
recipe) or 2 with a message that names the damaged key or a section above it, and never a
traceback. Examples are drawn deterministically (``derandomize``), so CI sees the same ones.
"""

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safecl.cli import main
from safecl.config import is_local_source, resolve_source
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SWAPS = ["text", 3, 0.5, True, False, None, [], [1, "a"], {}, {"x": 1}]
EXTREMES = [0, -1, 10**30, -(10**30), 1e308, math.inf, -math.inf, math.nan, "", "x" * 10_000]


def paths(node, prefix=()):
    """Every key path and list index under ``node`` (sections and list items included)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from paths(value, prefix + (key,))


def damage(raw: dict, path: tuple, kind: str, value):
    parent = raw
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if kind == "delete":
        if isinstance(parent, list):
            parent.pop(last)
        else:
            del parent[last]
    else:
        parent[last] = value


def absolute_sources(node, base: Path):
    """Relative data paths made absolute, so the recipe validates from any folder."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("source", "safety_source") and isinstance(value, str) and is_local_source(value):
                node[key] = str(resolve_source(value, base).resolve())
            else:
                absolute_sources(value, base)
    elif isinstance(node, list):
        for value in node:
            absolute_sources(value, base)
    return node


@st.composite
def damaged_recipe(draw):
    source = draw(st.sampled_from(RECIPES))
    raw = absolute_sources(yaml.safe_load(source.read_text()), source.parent)
    damages = []
    for _ in range(draw(st.integers(1, 3))):
        where = list(paths(raw))
        if not where:
            break
        path = draw(st.sampled_from(where))
        kind = draw(st.sampled_from(["delete", "swap", "extreme"]))
        value = draw(st.sampled_from(SWAPS if kind == "swap" else EXTREMES))
        damage(raw, path, kind, value)
        damages.append(path)
    return source, raw, damages


def dotted(path) -> str:
    return ".".join(map(str, path))


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=damaged_recipe())
def test_a_damaged_shipped_recipe_validates_or_is_refused_naming_the_key(case, tmp_path_factory, capsys):
    source, raw, damages = case
    path = Path(tmp_path_factory.mktemp("fuzz")) / source.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), (damages, err)
    assert "Traceback" not in err, err
    if code == 2:
        names = {dotted(p[:n]) for p in damages for n in range(1, len(p) + 1)}
        assert any(name in err for name in names), (damages, err)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_validates_undamaged(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
