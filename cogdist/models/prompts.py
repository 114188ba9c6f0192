"""Prompts encoded once: rows that share a prompt and negative prompt (a row's --samples, a caption
repeated across a dataset) share one text-encoder pass, within a unit and across the last few
units. An encoding depends only on the text and the encoder, so reusing it changes no pixel."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

CACHED = 8
"""Distinct encodings a worker keeps: one prompt's are megabytes on the GPU (GLM-4's hidden states)."""


class PromptCache:
    """The last CACHED encodings, by key (the text and the settings that change its encoding)."""

    def __init__(self, size: int = CACHED):
        self.size = size
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.passes = 0
        """Encoder passes made (the rest were reused): what the tests count."""

    def get(self, key: Hashable, encode: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = encode()
        self.passes += 1
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


def prompt_cache(pipe: Any) -> PromptCache:
    """The cache of a worker's pipeline, kept on it (each family's runner encodes through it)."""
    cache = getattr(pipe, "_cogdist_prompts", None)
    if cache is None:
        cache = PromptCache()
        pipe._cogdist_prompts = cache
    return cache
