"""--dataset webdataset / parquet: the driver stores the outputs the workers return, in shards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogdist.sink.base import Sink
from cogdist.sink.dataset import ShardWriter, prepare_shards
from cogdist.sink.encode import extension

if TYPE_CHECKING:
    from cogdist.scheduler import Finished


class ShardSink(Sink):
    """Samples wait in memory until their shard is written; their rows enter the index then."""

    returns_outputs = True

    def _open(self, shard_size: int) -> None:
        first = prepare_shards(self.out, self.kind)
        self.shards = ShardWriter(self.out, self.kind, shard_size, first, self.index.schema)

    def _store(self, rows: list[dict], finished: list[Finished]) -> None:
        for row, f in zip(rows, finished):
            self.shards.add(row, f.result.data or b"", extension(self.format))

    @property
    def wants_commit(self) -> bool:
        return self.shards.full

    def commit(self, flush: bool = False, final: bool = False) -> None:
        if flush:
            self.index.add(self.shards.flush())
        super().commit(final=final)
