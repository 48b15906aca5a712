"""The docs cannot rot: what README.md and docs/ show is run against the code.

- Every line starting with ``safecl`` in a fenced shell block (bash, sh, shell, console) of
  README.md and docs/**/*.md is run in-process through :func:`safecl.cli.main`, in a safe form:

  ======================================  ==================================================
  command                                  safe form
  ======================================  ==================================================
  ``--help``, ``--version``, ``schema``,   as written
  ``data list``, ``validate``
  ``train``                                with ``--dry-run`` (``--resume`` and
                                           ``--restart-from`` dropped); a placeholder recipe
                                           (``recipe.yaml``, not a file) becomes the smoke
                                           recipe; ``--accelerate-config`` checked as a launch
                                           would
  ``audit``, ``compose``, ``compact`` on   as written, on a small smoke run (the quickstart's
  ``runs/quickstart`` or ``runs/smoke``    stage names), outputs under a temporary folder
  anything else (``check``, ``merge``,     parsed by the real parser (an unknown or deleted
  another run's ``audit``)                 flag fails), and the recipe it names validated with
                                           its overrides
  ======================================  ==================================================

- Every recipe file the docs name (``recipes/*.yaml``) and every full recipe they show (a YAML
  block with ``version`` and ``stages``) validates; every repository file they name exists.
- The generated reference pages (docs/_hooks/reference.py) cover every recipe key and flag.

The blocks are collected with Sybil's Markdown code-block lexer. ``mkdocs build --strict``
(broken links and anchors, pages missing from the nav) runs in ``make test`` beside pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shlex
import tempfile
from pathlib import Path

import pytest
import yaml
from sybil import Document
from sybil.parsers.markdown import CodeBlockParser

from conftest import SMOKE

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
RUN_ALIASES = ("runs/quickstart", "runs/smoke")  # runs with the smoke recipe's stage names
EXECUTED_ON_A_RUN = {"audit", "compose", "compact"}
RUN_AS_WRITTEN = {"schema", "data", "validate"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(path: Path, languages) -> list[tuple[int, str]]:
    """(line, source) of every fenced block of ``path`` in one of ``languages``."""
    document = Document.parse(str(path), *(CodeBlockParser(language=lang) for lang in languages))
    return [(example.line, example.parsed) for example in document.examples()]


def safecl_commands() -> list[tuple[str, list[str]]]:
    """('file:line', argv after 'safecl') for every shell line that starts with ``safecl``."""
    found = []
    for path in DOC_FILES:
        for start, source in code_blocks(path, SHELL_LANGUAGES):
            lines = source.splitlines()
            i = 0
            while i < len(lines):
                first = i
                line = lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                words = shlex.split(line, comments=True)
                if words and words[0] == "safecl":
                    found.append((f"{rel(path)}:{start + first}", words[1:]))
    return found


COMMANDS = safecl_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30, COMMANDS  # the collector finds what the pages show
    assert {argv[0] for _, argv in COMMANDS} >= {"train", "validate", "audit", "compose", "check", "merge"}


# ----------------------------------------------------------------------------- the safe forms


def command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse as ``safecl.cli.main`` does (overrides may follow options), without running."""
    from safecl.cli import parse_args

    return parse_args(argv)


def train_safe_form(argv: list[str]) -> list[str]:
    args = parse(argv)
    recipe = args.recipe
    if not (ROOT / recipe).is_file() and "/" not in recipe:  # a placeholder such as recipe.yaml
        recipe = str(SMOKE.relative_to(ROOT))
    if args.accelerate_config:
        from safecl.training.sharding import check_accelerate_config

        check_accelerate_config(args.accelerate_config)
    out = ["train", recipe, *args.overrides, "--dry-run"]
    if args.start_from:
        out += ["--from", args.start_from]
    return out


def on_smoke_run(argv: list[str], run: Path, scratch: Path) -> list[str] | None:
    """``argv`` with the aliased run directories pointed at ``run`` and every other ``runs/``
    path at ``scratch``; None when it reads a run that is not an alias."""
    args = parse(argv)
    inputs = list(getattr(args, "run_dirs", None) or [getattr(args, "run", None) or getattr(args, "source", "")])
    if not inputs or not all(_alias(p) for p in inputs if p):
        return None

    def point(token: str) -> str:
        if "=" in token and token.startswith("--"):
            flag, _, value = token.partition("=")
            return f"{flag}={point(value)}"
        alias = _alias(token)
        if alias:
            return str(run) + token[len(alias):]
        if token.startswith("runs/"):
            return str(scratch / token)
        return token

    return [point(t) for t in argv]


def _alias(path: str) -> str | None:
    return next((a for a in RUN_ALIASES if path == a or path.startswith(a + "/")), None)


def validate_named_recipe(args: argparse.Namespace) -> None:
    from safecl.recipe import load_recipe

    recipe = getattr(args, "recipe", None)
    if recipe:
        load_recipe(ROOT / recipe, list(getattr(args, "overrides", []) or []))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A small run of the smoke recipe (same stage names as the quickstart), trained in-process."""
    from safecl.cli import main

    out = tmp_path_factory.mktemp("docs-run") / "run"
    overrides = [f"output_dir={out}", "tracking.enabled=false", "train.max_steps=2", "adapter.calibration_steps=1",
                 "retention.harmful.limit=2", "retention.benign.limit=2", "retention.max_new_tokens=4",
                 "stages.1.eval.limit=2", "stages.2.eval.limit=2"]
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
        assert main(["train", str(SMOKE), *overrides]) == 0
    return out


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w} safecl {' '.join(a)[:60]}" for w, a in COMMANDS])
def test_documented_command_runs(where, argv, monkeypatch, tmp_path, capsys, request):
    from safecl.cli import main

    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository
    command = command_of(argv)
    if "--help" in argv or "-h" in argv or "--version" in argv:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0, f"{where}: safecl {shlex.join(argv)}"
        return
    if command == "train":
        run = train_safe_form(argv)
    elif command in RUN_AS_WRITTEN:
        run = argv
    elif command in EXECUTED_ON_A_RUN and on_smoke_run(argv, Path("/r"), tmp_path) is not None:
        run = on_smoke_run(argv, request.getfixturevalue("smoke_run"), tmp_path)
    else:  # needs a model, adapter or run the repository does not hold: parse it and check its recipe
        validate_named_recipe(parse(argv))
        return
    rc = main(run)
    err = capsys.readouterr().err
    assert rc == 0, f"{where}: safecl {shlex.join(argv)}\n(ran as: safecl {shlex.join(run)})\n{err}"


# ----------------------------------------------------------------------------- recipes and files


def doc_text() -> dict[str, str]:
    return {rel(p): p.read_text(encoding="utf-8") for p in DOC_FILES}


NAMED_RECIPES = sorted({m for text in doc_text().values()
                        for m in re.findall(r"(?<![\w/.-])recipes/[\w.-]+\.ya?ml", text)})


def test_the_docs_name_recipes():
    assert "recipes/smoke.yaml" in NAMED_RECIPES and "recipes/quickstart.yaml" in NAMED_RECIPES


@pytest.mark.parametrize("recipe", NAMED_RECIPES)
def test_named_recipe_validates(recipe):
    from safecl.recipe import load_recipe

    assert (ROOT / recipe).is_file(), f"the docs name {recipe}, which does not exist"
    load_recipe(ROOT / recipe)


def shown_recipes() -> list[tuple[str, str]]:
    """('file:line', YAML) of every YAML block that is a whole recipe (has version and stages)."""
    found = []
    for path in DOC_FILES:
        for line, source in code_blocks(path, ("yaml", "yml")):
            try:
                data = yaml.safe_load(source)
            except yaml.YAMLError:
                continue  # a fragment with "..." placeholders
            if isinstance(data, dict) and {"version", "stages"} <= data.keys():
                found.append((f"{rel(path)}:{line}", source))
    return found


SHOWN_RECIPES = shown_recipes()


def test_the_docs_show_a_whole_recipe():
    assert SHOWN_RECIPES


@pytest.mark.parametrize("where,source", SHOWN_RECIPES, ids=[w for w, _ in SHOWN_RECIPES])
def test_shown_recipe_validates(where, source):
    """A recipe shown in the docs, saved at the repository root (its relative paths resolve there)."""
    from safecl.recipe import load_recipe

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=".docs-recipe-", dir=ROOT) as f:
        f.write(source)
        f.flush()
        load_recipe(f.name)


REPO_PATH = re.compile(r"`((?:recipes|accelerate_configs|benchmarks|notebooks|tests|safecl)/[\w./-]+"
                       r"\.(?:py|ya?ml|csv|json|jsonl|md|ipynb|txt|png))`")


def test_named_repository_files_exist():
    missing = sorted({f"{name}: {m}" for name, text in doc_text().items() for m in REPO_PATH.findall(text)
                      if not (ROOT / m).exists()})
    assert not missing, missing


def test_readme_is_the_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "<!-- quickstart-table -->" in readme and "<!-- /quickstart-table -->" in readme
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links


# ----------------------------------------------------------------------------- generated reference


def reference_hook():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_lists_every_key():
    from pydantic import BaseModel

    hook = reference_hook()
    page = hook.recipe_keys_markdown()
    for name, model in hook._models().items():
        assert issubclass(model, BaseModel)
        assert f"## {name} " in page, name
        for key in model.model_fields:
            assert f"| `{key}` |" in page, f"{name}.{key}"


def test_cli_reference_lists_every_flag():
    hook = reference_hook()
    page = hook.cli_markdown()
    for command, text in hook.cli_helps():
        assert f"## `{command}`" in page
    for flag in ("--dry-run", "--resume", "--restart-from", "--from", "--num-processes", "--accelerate-config",
                 "--baseline", "--stages", "--rejudge", "--labels"):
        assert flag in page, flag
