"""The progress line of a render: done/failed/pending, items/s and ETA, and each replica's state."""

from __future__ import annotations

import sys
from collections import Counter

from tqdm import tqdm

# Beyond this many replicas the line counts them by state instead of listing each one.
LISTED_REPLICAS = 8


class Progress:
    def __init__(self, total: int, enabled: bool, replicas: int):
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            unit="item",
            desc="render",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            # Without a terminal (Ray job logs, CI) print a line every 10 s instead of redrawing.
            mininterval=0.5 if tty else 10.0,
            smoothing=0.1,
        )
        self.total = total
        self.done = 0
        self.failed = 0
        self.replicas = ["starting"] * replicas
        self.nodes = 0
        self.compile_seconds = 0.0
        self._postfix()

    def _postfix(self) -> None:
        if not self.bar.disable:  # a line nobody sees is not worth building for every row
            self.bar.set_postfix_str(self.describe(), refresh=False)

    def describe(self) -> str:
        """`done=3 failed=0 pending=5 | replicas 0:busy 1:starting | nodes 1 | compile 12s` (or
        counts per state)."""
        pending = self.total - self.done - self.failed
        if len(self.replicas) <= LISTED_REPLICAS:
            states = " ".join(f"{i}:{state}" for i, state in enumerate(self.replicas))
        else:
            states = ", ".join(f"{n} {state}" for state, n in sorted(Counter(self.replicas).items()))
        nodes = f" | nodes {self.nodes}" if self.nodes else ""
        compiled = f" | compile {self.compile_seconds:.0f}s" if self.compile_seconds else ""
        return f"done={self.done} failed={self.failed} pending={pending} | replicas {states}{nodes}{compiled}"

    def advance(self, done: int = 0, failed: int = 0, compile_seconds: float = 0.0) -> None:
        """`compile_seconds`: the finished rows' compile time (--compile), summed over workers."""
        self.done += done
        self.failed += failed
        self.compile_seconds += compile_seconds
        self._postfix()
        self.bar.update(done + failed)

    def set_replicas(self, states: list[str], nodes: int = 0) -> None:
        """Each replica's state (starting, waiting, restarting, idle, busy, draining or lost), and
        the nodes the ready ones are on."""
        if states != self.replicas or nodes != self.nodes:
            self.replicas, self.nodes = list(states), nodes
            self._postfix()
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
