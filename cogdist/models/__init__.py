"""Model families. `registry` is plain data; each family module holds its torch code."""

from __future__ import annotations

import importlib
from types import ModuleType


def family_module(family: str) -> ModuleType:
    """The module that builds, loads and runs pipelines of `family` (imports torch)."""
    return importlib.import_module(f"cogdist.models.{family}")
