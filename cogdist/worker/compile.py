"""`--compile`: regional torch.compile of the transformer's repeated blocks.

Compiling the blocks, not the whole transformer, costs one block's compile (the blocks share
their code, and torch inlines a module's parameters as inputs, so one compiled graph serves all
of them): seconds instead of minutes. diffusers' `compile_repeated_blocks` does this where the
model declares its blocks (GLM-Image); for the others (CogView4, CogVideoX) the blocks are the
transformer's longest list of modules of one class.

A bucket's first unit compiles; later units of the same shapes reuse it. Shapes start static (the
fastest kernels); a unit whose shapes differ (another size, row count, or prompt length: CogView4
and GLM-Image pad the text to a multiple of 16 tokens) compiles once more with the dimensions
that changed made dynamic (torch's automatic dynamic shapes), and that graph serves the sizes
after it. `CompileClock.before_unit` raises dynamo's recompile limit with each bucket a worker
has seen, so no bucket falls back to eager. Inductor's caches live on the
node's disk (COMPILE_CACHE, unless TORCHINDUCTOR_CACHE_DIR is set): a rebuilt replica or the
next job on the node compiles a known shape from the cache.

`--compile` changes pixels by rounding only (inductor fuses and reorders float operations; see
tests/test_compile.py), so it is a recorded setting, free to change on resume. This module is
imported by the driver (`check_compile`); torch is imported lazily.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cogdist.errors import UsageError
from cogdist.models.spec import NO_CACHE

COMPILE_CACHE = Path("~/.cache/cogdist/torchinductor")
"""Inductor's cache on the node (TORCHINDUCTOR_CACHE_DIR, where set, wins)."""
RECOMPILE_HEADROOM = 8
"""dynamo's default recompile limit, kept on top of the buckets a worker has seen."""
GRAPHS_PER_BUCKET = 2
"""Compiled graphs of the block code per bucket: CogVideoX's first block receives a strided view
of the tokens, the others contiguous ones (one graph each)."""


def check_compile(compile: bool, cache: str) -> None:
    """Refuse what --compile does not work with."""
    if compile and cache != NO_CACHE:
        raise UsageError(
            f"--compile with --cache {cache}: the cache's hooks decide at every step, from a tensor's "
            "value, whether each block runs, which breaks every compiled block into pieces and "
            "recompiles them; choose one"
        )


def use_node_cache() -> str:
    """Point inductor at the node's cache (before its first compile); returns the folder."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(COMPILE_CACHE.expanduser())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def repeated_blocks(transformer) -> list:
    """The transformer's repeated blocks: those its class declares (`_repeated_blocks`), else its
    longest `nn.ModuleList` of modules of one class."""
    import torch

    declared = getattr(transformer, "_repeated_blocks", None) or ()
    if declared:
        return [m for m in transformer.modules() if type(m).__name__ in declared]
    lists = [
        m
        for m in transformer.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
    ]
    if not lists:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks to compile")
    return list(max(lists, key=len))


def compile_transformer(transformer, backend: str = "inductor") -> int:
    """Compile each repeated block of `transformer` in place (with torch.compile's `backend`:
    a benchmark's own check of its plumbing may trace without inductor); returns how many."""
    use_node_cache()
    blocks = repeated_blocks(transformer)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


class CompileClock:
    """Seconds spent compiling, and compiles, from dynamo's compile callbacks (every frame it
    compiles, graph and inductor codegen included)."""

    def __init__(self) -> None:
        import torch._dynamo

        self.seconds = 0.0
        self.compiles = 0
        self._started: float | None = None
        self._lock = threading.Lock()
        self._buckets: set[tuple] = set()
        torch._dynamo.callback_handler.register_start_callback(self._start)
        torch._dynamo.callback_handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        with self._lock:
            self._started = time.perf_counter()
            self.compiles += 1

    def _end(self, _args) -> None:
        with self._lock:
            if self._started is not None:
                self.seconds += time.perf_counter() - self._started
                self._started = None

    def before_unit(self, bucket: tuple) -> None:
        """A unit of `bucket` (its rows' shape and their count) is about to render: room in dynamo's
        recompile limit for one compile per bucket seen."""
        import torch._dynamo

        self._buckets.add(bucket)
        limit = RECOMPILE_HEADROOM + GRAPHS_PER_BUCKET * len(self._buckets)
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
