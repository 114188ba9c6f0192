"""What lets a worker read, render and store three units at once: a turnstile that keeps renders
one at a time and in the driver's order, and a buffer that bounds the bytes waiting to be stored.

A worker actor is threaded (`max_concurrency`): while one call renders, the next reads its inputs
and the previous encodes and uploads its outputs. Ray runs a threaded actor's calls in any order,
so the driver numbers each replica's units (`WorkUnit.turn`) and the turnstile lets them render in
that order: every rank of a gang then enters its collectives with the same unit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

OUTPUT_BUFFER_BYTES = 1 << 30
"""Rendered pixels a worker holds while they are encoded and stored; a slow store makes the next
render wait instead of filling memory."""


class Turnstile:
    """One unit renders at a time, in the order of `turn` (None: in the order calls come, for a
    caller that makes one call at a time)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next = 0
        self._busy = False

    @contextlib.contextmanager
    def turn(self, number: int | None) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._busy and number in (None, self._next))
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                if number is not None:
                    self._next = number + 1
                self._changed.notify_all()


class OutputBuffer:
    """Bytes of rendered outputs not yet stored. `hold` waits until the bytes fit, and always
    admits a unit when nothing else is held (one unit larger than the whole buffer still renders)."""

    def __init__(self, capacity: int = OUTPUT_BUFFER_BYTES) -> None:
        self.capacity = capacity
        self.held = 0
        self._changed = threading.Condition()

    def hold(self, size: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + size <= self.capacity)
            self.held += size

    def release(self, size: int) -> None:
        with self._changed:
            self.held -= size
            self._changed.notify_all()
