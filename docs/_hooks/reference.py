"""MkDocs hook: the reference pages written from the code at build time, so they cannot drift.

A page that holds one of these markers gets it replaced by generated Markdown:

- ``<!-- generated: recipe-keys -->``: every recipe key, from the pydantic schema
  (:meth:`safecl.recipe.schema.Recipe.model_json_schema`, the same document ``safecl schema``
  prints): one table per section, with type, constraints, default and the field's description.
- ``<!-- generated: cli -->``: every ``safecl`` command's ``--help``, from the argparse parser
  of :func:`safecl.cli.build_parser`.

A new recipe key or command flag therefore appears in the docs without editing them. The
functions are plain, so the tests call them too.
"""

from __future__ import annotations

import json
import os
import re

RECIPE_MARKER = "<!-- generated: recipe-keys -->"
CLI_MARKER = "<!-- generated: cli -->"


# ----------------------------------------------------------------------------- recipe keys


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(name: str) -> str:
    return "key-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _type(node: dict) -> str:
    """A JSON-schema node as a short type: ``integer > 0``, ``"a" | "b"``, ``list of DataConfig``."""
    if "$ref" in node:
        name = _ref_name(node["$ref"])
        return f"[{name}](#{_anchor(name)})"
    if "anyOf" in node:
        parts = [_type(n) for n in node["anyOf"]]
        return " or ".join(dict.fromkeys(parts))
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        text = "list of " + (_type(node["items"]) if "items" in node else "any")
    elif kind == "object":
        extra = node.get("additionalProperties")
        text = "map of string to " + _type(extra) if isinstance(extra, dict) else "map"
    else:
        text = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean",
                "null": "null"}.get(kind, "any")
    bounds = [f"{op} {node[key]}" for key, op in (("exclusiveMinimum", ">"), ("minimum", ">="),
                                                 ("exclusiveMaximum", "<"), ("maximum", "<="))
              if key in node]
    if "minItems" in node:
        bounds.append(f"at least {node['minItems']} item{'s' if node['minItems'] != 1 else ''}")
    if "pattern" in node:
        bounds.append(f"matching `{node['pattern']}`")
    return text + (" " + ", ".join(bounds) if bounds else "")


def _default(prop: dict, required: bool, factory=None) -> str:
    if required:
        return "**required**"
    if "default" in prop:
        return f"`{json.dumps(prop['default'])}`"
    if factory is not None:  # a default_factory, which JSON schema leaves out
        from pydantic import BaseModel

        value = factory.get_default(call_default_factory=True)
        if not isinstance(value, BaseModel):
            return f"`{json.dumps(value)}`"
    return "(its section's defaults)" if "$ref" in prop else "-"


def _models() -> dict:
    """Every pydantic model class the recipe uses, by name (the schema's $defs keys)."""
    import typing

    from pydantic import BaseModel

    from safecl.recipe.schema import Recipe

    found: dict = {}

    def walk(tp) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for field in tp.model_fields.values():
                walk(field.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(Recipe)
    return found


def _cell(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"``([^`]+)``", r"`\1`", text)  # reST literals -> Markdown code
    return text.replace("|", "\\|")


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [_ref_name(node["$ref"])] if "$ref" in node else []
        for value in node.values():
            found += _refs(value)
        return found
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def recipe_sections() -> list[tuple[str, list[str], dict]]:
    """(section name, dotted paths where it appears, its JSON schema) in reading order, the
    recipe's top level first; every section of the schema exactly once."""
    from safecl.recipe.schema import Recipe

    schema = Recipe.model_json_schema()
    defs = schema.get("$defs", {})
    where: dict[str, list[str]] = {"Recipe": ["(top level)"]}
    order = ["Recipe"]
    queue = [("Recipe", "", schema)]
    while queue:
        _, prefix, node = queue.pop(0)
        for key, prop in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            for ref in dict.fromkeys(_refs(prop)):
                is_list = prop.get("type") == "array" or any(n.get("type") == "array" for n in prop.get("anyOf", []))
                shown = f"{path}.N" if is_list else path
                where.setdefault(ref, [])
                if shown not in where[ref]:
                    where[ref].append(shown)
                if ref not in order:
                    order.append(ref)
                    queue.append((ref, shown + ".", defs[ref]))
    missing = [name for name in defs if name not in order]
    order += missing  # unreachable definitions would still be listed
    return [(name, where.get(name, []), schema if name == "Recipe" else defs[name]) for name in order]


def recipe_keys_markdown() -> str:
    out, models = [], _models()
    for name, paths, node in recipe_sections():
        fields = models[name].model_fields if name in models else {}
        out.append(f"## {name} {{#{_anchor(name)}}}\n")
        out.append("Appears at: " + ", ".join(f"`{p}`" for p in paths) + "\n")
        if node.get("description") and name != "Recipe":
            out.append(_doc_paragraphs(node["description"]) + "\n")
        out.append("| key | type | default | what it is |")
        out.append("| --- | --- | --- | --- |")
        required = set(node.get("required", []))
        for key, prop in node.get("properties", {}).items():
            out.append(f"| `{key}` | {_type(prop)} | {_default(prop, key in required, fields.get(key))} | "
                       f"{_cell(prop.get('description', ''))} |")
        out.append("")
    return "\n".join(out)


def _doc_paragraphs(text: str) -> str:
    """A class docstring as Markdown: reST literals to code spans, ``::`` blocks fenced."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r":(?:mod|class|func|meth|attr):`~?([^`]+)`", r"`\1`", text)
    lines, out, in_block = text.splitlines(), [], False
    for line in lines:
        if in_block and line and not line.startswith(" "):
            out.append("```")
            in_block = False
        if line.rstrip().endswith("::") and not in_block:
            out.append(line.rstrip()[:-1])
            out.append("```text")
            in_block = True
            continue
        out.append(line)
    if in_block:
        out.append("```")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI


COMMANDS = ["train", "validate", "schema", "data", "audit", "check", "compose", "compact", "merge"]


def cli_helps() -> list[tuple[str, str]]:
    """(command line, its --help text) for ``safecl`` and every command and subcommand."""
    import argparse

    from safecl.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        top = build_parser()
        helps = [("safecl", top.format_help())]
        names = list(_subparsers(top).choices)
        for name in COMMANDS + [n for n in names if n not in COMMANDS]:
            sub = _subparsers(build_parser(name)).choices[name]
            helps.append((f"safecl {name}", sub.format_help()))
            nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            for action in nested:
                for sub_name, parser in action.choices.items():
                    helps.append((f"safecl {name} {sub_name}", parser.format_help()))
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return helps


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cli_markdown() -> str:
    out = []
    for command, text in cli_helps():
        out.append(f"## `{command}`\n")
        out.append("```text")
        out.append(text.rstrip())
        out.append("```\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- the hook


def on_page_markdown(markdown: str, page, config, files) -> str:
    if RECIPE_MARKER in markdown:
        markdown = markdown.replace(RECIPE_MARKER, recipe_keys_markdown())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    return markdown
