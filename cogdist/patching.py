"""Replacing a method on one object for the length of a block, and putting back what was there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name = value` inside the block. After it, an attribute set on the instance before (by
    diffusers' hooks, or an outer wrapper) is restored; otherwise the class's method shows again."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)
