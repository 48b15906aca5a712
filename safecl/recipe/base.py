"""The recipe's section base and key flattener, kept here for existing imports.

Both live in :mod:`safecl.config` (the bottom room), so data/, evaluation/ and tracking use
them without importing the recipe package.
"""

from safecl.config import Section, flatten_keys

__all__ = ["Section", "flatten_keys"]
