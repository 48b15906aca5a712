"""Recipe schema and loading (see schema.py for the format, loader.py for errors and overrides).

Names are imported lazily, so importing ``safecl.recipe.base`` does not load the whole schema.
The sections the schema gathers live with what they configure (data/, evaluation/,
tracking.py) and build on :mod:`safecl.config`; none of them imports this package.
"""

__all__ = ["Recipe", "load_recipe", "dump_recipe"]


def __getattr__(name):
    if name == "Recipe":
        from safecl.recipe.schema import Recipe

        return Recipe
    if name in ("load_recipe", "dump_recipe"):
        from safecl.recipe import loader

        return getattr(loader, name)
    raise AttributeError(name)
