"""The progress line of a render: done/failed, items/s and ETA, replicas ready."""

from __future__ import annotations

import sys

from tqdm import tqdm


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
        self.failed = 0
        self.replicas = replicas
        self.ready = 0
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"failed={self.failed} replicas={self.ready}/{self.replicas}", refresh=False)

    def advance(self, done: int = 0, failed: int = 0) -> None:
        self.failed += failed
        self._postfix()
        self.bar.update(done + failed)

    def set_ready(self, ready: int) -> None:
        if ready != self.ready:
            self.ready = ready
            self._postfix()
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
