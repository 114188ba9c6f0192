"""The pending set: manifest rows whose ids are not yet in the index (nor, by default, failed).

Ids already done are held as one Arrow string array. The manifest's id column is read once and
matched against them with a single `pyarrow.compute.is_in` (one hash table for the whole scan),
leaving one bit per manifest row; rendering then streams the manifest again and keeps the rows
whose bit is set. Resuming a job of a million rows costs a scan of two id columns, not a Python
set of every id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.manifest.rows import RowDefaults, work_items
from cogdist.manifest.source import ManifestSource
from cogdist.models.registry import ModelSpec
from cogdist.work import WorkItem


@dataclass(frozen=True)
class PendingSet:
    total: int
    """Rows in the manifest."""
    done: int
    """Rows already in the index."""
    failed: int
    """Rows recorded as failed (and not done), skipped unless retried."""
    render: pa.ChunkedArray
    """One boolean per manifest row, in manifest order: render it?"""

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def _member(ids: pa.ChunkedArray, values: pa.Array) -> pa.ChunkedArray:
    if len(values) == 0:
        return pa.chunked_array([pa.array([False] * len(c), pa.bool_()) for c in ids.chunks], pa.bool_())
    return pc.fill_null(pc.is_in(ids, value_set=values), False)


def scan_pending(source: ManifestSource, done: pa.Array, failed: pa.Array) -> PendingSet:
    ids = pa.chunked_array(
        [pc.cast(part.batch.column("id"), pa.string()) for part in source.batches(columns=["id"])],
        pa.string(),
    )
    in_done = _member(ids, done)
    in_failed = pc.and_(_member(ids, failed), pc.invert(in_done))
    render = pc.invert(pc.or_(in_done, in_failed))
    return PendingSet(
        total=len(ids),
        done=pc.sum(in_done).as_py() or 0,
        failed=pc.sum(in_failed).as_py() or 0,
        render=render,
    )


def pending_rows(
    source: ManifestSource, pending: PendingSet, spec: ModelSpec, defaults: RowDefaults
) -> Iterator[tuple[WorkItem, dict]]:
    """(WorkItem, manifest row) for every row to render, in manifest order."""
    offset = 0
    for part in source.batches():
        n = part.batch.num_rows
        keep = pending.render.slice(offset, n).combine_chunks()
        offset += n
        if pc.any(keep).as_py():
            yield from work_items(part.batch.filter(keep), spec, defaults)
