"""The pending set: manifest rows whose ids are not yet in the index (nor, by default, failed).

Ids already done are held as one Arrow string array and matched with `pyarrow.compute.is_in`
one record batch at a time, so resuming a job of millions of rows costs a scan of two id
columns, not a Python set of every id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.manifest.rows import work_items
from cogdist.manifest.source import ManifestSource
from cogdist.models.registry import ModelSpec
from cogdist.work import WorkItem


@dataclass(frozen=True)
class PendingCount:
    total: int  # rows in the manifest
    done: int  # rows already in the index
    failed: int  # rows recorded as failed and skipped (0 with --retry-failed)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def _mask(ids: pa.Array, values: pa.Array) -> pa.Array:
    if len(values) == 0:
        return pa.array([False] * len(ids), pa.bool_())
    return pc.fill_null(pc.is_in(pc.cast(ids, pa.string()), value_set=values), False)


def count_pending(source: ManifestSource, done: pa.Array, failed: pa.Array) -> PendingCount:
    total = n_done = n_failed = 0
    for part in source.batches(columns=["id"]):
        ids = part.batch.column("id")
        in_done = _mask(ids, done)
        total += len(ids)
        n_done += pc.sum(in_done).as_py() or 0
        n_failed += pc.sum(pc.and_(_mask(ids, failed), pc.invert(in_done))).as_py() or 0
    return PendingCount(total, n_done, n_failed)


def pending_rows(
    source: ManifestSource, skip: pa.Array, spec: ModelSpec, extension: str
) -> Iterator[tuple[WorkItem, dict]]:
    """(WorkItem, manifest row) for every row whose id is not in `skip`, in manifest order."""
    for part in source.batches():
        keep = pc.invert(_mask(part.batch.column("id"), skip))
        batch = part.batch.filter(keep)
        if batch.num_rows:
            yield from work_items(batch, spec, extension)
