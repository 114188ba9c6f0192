"""--dataset files: every worker stores its outputs under outputs/; the index points at them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogdist.sink.base import Sink

if TYPE_CHECKING:
    from cogdist.scheduler import Finished


class FileSink(Sink):
    """One file per row, already stored by its worker: only the index rows are left to commit."""

    def _store(self, rows: list[dict], finished: list[Finished]) -> None:
        self.index.add(rows)
