"""The sink interface: what the driver does with finished and failed rows.

A Sink turns each finished row into its index row (the columns of cogdist.sink.ledger), stores
what the workers returned, and commits the index and the failure records in batches. The render
loop drives any sink the same way; `cogdist.sink.SINKS` chooses one from --dataset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa

from cogdist.sink.journal import DEFAULT_INDEX_INTERVAL, IndexWriter
from cogdist.sink.ledger import (
    FAILURE_SCHEMA,
    FAILURES,
    Outcome,
    PartWriter,
    index_row,
    index_schema,
    now_utc,
)
from cogdist.storage import Location

if TYPE_CHECKING:
    from cogdist.scheduler import Failed, Finished


class Sink(ABC):
    """Where a job's rows go. `add` takes rows as they finish, `commit` makes them durable: the
    index part and failure records of everything added (and stored) since the last commit."""

    returns_outputs: ClassVar[bool] = False
    """Workers return each encoded output to the driver (which stores it) instead of storing it."""

    def __init__(
        self,
        out: Location,
        kind: str,
        manifest_schema: pa.Schema,
        model: str,
        format: str,
        shard_size: int,
        commit_interval: float,
        index_interval: float = DEFAULT_INDEX_INTERVAL,
    ):
        self.out = out
        self.kind = kind
        self.model = model
        self.format = format
        self.index = IndexWriter(out, index_schema(manifest_schema), commit_interval, index_interval)
        self._open(shard_size)
        self.failures = PartWriter(out, FAILURES, FAILURE_SCHEMA)

    def _open(self, shard_size: int) -> None:
        """Prepare OUT for this sink's outputs (before any row is added); nothing by default."""
        return None

    @abstractmethod
    def _store(self, rows: list[dict], finished: list[Finished]) -> None:
        """Take the index rows of `finished` (and what their workers returned)."""

    def add(self, finished: list[Finished], failed: list[Failed], replica: int | None = None) -> None:
        """Rows rendered by `replica`, and rows that failed for good."""
        if finished:
            rows = [
                index_row(
                    f.row.manifest_row,
                    Outcome(
                        f.row.item, f.result, f.row.attempts + 1, self.out, self.model, self.format, replica
                    ),
                )
                for f in finished
            ]
            self._store(rows, finished)
        if failed:
            self.failures.add(
                [
                    {
                        "id": f.row.item.id,
                        "error": f.error,
                        "attempts": f.row.attempts + f.row.crashes,
                        "model": self.model,
                        "failed_at": now_utc(),
                    }
                    for f in failed
                ]
            )

    @property
    def pending(self) -> int:
        """Rows an ordinary commit would write (outputs still held in memory excluded)."""
        return self.index.pending + self.failures.pending

    @property
    def wants_commit(self) -> bool:
        """The sink holds enough to be flushed now (a full shard)."""
        return False

    def commit(self, flush: bool = False, final: bool = False) -> None:
        """Commit the index rows (to the journal, see cogdist.sink.journal) and failures added so
        far; `flush`: first store what is held in memory (a partial shard) too; `final`: the job
        ends, fold the journal into index/. Raises StorageError when OUT refuses it."""
        self.index.commit(final=final)
        self.failures.commit()

    def clean_up(self) -> None:
        """After the final commit: delete what it left to delete (the folded journal parts)."""
        self.index.clean_up()
