"""The pending set: manifest rows whose ids are not yet in the index (nor, by default, failed).

Ids already done are held as one Arrow string array. The manifest's id column is read once and
matched against them with a single `pyarrow.compute.is_in` (one hash table for the whole scan),
leaving one bit per manifest row; rendering then streams the manifest again and keeps the rows
whose bit is set. Resuming a job of a million rows costs a scan of two id columns, not a Python
set of every id.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.manifest.rows import RowDefaults, sample_of, work_items
from cogdist.manifest.source import ManifestSource
from cogdist.models.registry import ModelSpec
from cogdist.work import WorkItem


@dataclass(frozen=True)
class PendingSet:
    total: int
    """Rows to render in all: manifest rows times --samples."""
    done: int
    """Of those, already in the index."""
    failed: int
    """Recorded as failed (and not done), skipped unless retried."""
    render: tuple[pa.ChunkedArray, ...]
    """Per sample (--samples; one without), one boolean per manifest row, in manifest order:
    render it?"""

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


def _member(ids: pa.ChunkedArray, values: pa.Array) -> pa.ChunkedArray:
    if len(values) == 0:
        return pa.chunked_array([pa.array([False] * len(c), pa.bool_()) for c in ids.chunks], pa.bool_())
    return pc.fill_null(pc.is_in(ids, value_set=values), False)


def scan_pending(source: ManifestSource, done: pa.Array, failed: pa.Array, samples: int = 1) -> PendingSet:
    """Which rows, and which of their samples, are still to render."""
    ids = pa.chunked_array(
        [pc.cast(part.batch.column("id"), pa.string()) for part in source.batches(columns=["id"])],
        pa.string(),
    )
    render = []
    done_count = failed_count = 0
    for sample in range(samples):
        # A sample's id is its row's with "#k" appended (cogdist.work.sample_id).
        sample_ids = ids if sample == 0 else pc.binary_join_element_wise(ids, f"#{sample}", "")
        in_done = _member(sample_ids, done)
        in_failed = pc.and_(_member(sample_ids, failed), pc.invert(in_done))
        render.append(pc.invert(pc.or_(in_done, in_failed)))
        done_count += pc.sum(in_done).as_py() or 0
        failed_count += pc.sum(in_failed).as_py() or 0
    return PendingSet(total=len(ids) * samples, done=done_count, failed=failed_count, render=tuple(render))


def pending_rows(
    source: ManifestSource, pending: PendingSet, spec: ModelSpec, defaults: RowDefaults
) -> Iterator[tuple[WorkItem, dict]]:
    """(WorkItem, manifest row) for every row and sample to render, in manifest order, a row's
    samples one after another (they share a shape, so a unit holds several of them)."""
    offset = 0
    for part in source.batches():
        n = part.batch.num_rows
        keeps = [render.slice(offset, n).combine_chunks() for render in pending.render]
        offset += n
        keep = functools.reduce(pc.or_, keeps)
        if not pc.any(keep).as_py():
            continue
        if len(keeps) == 1:
            yield from work_items(part.batch.filter(keep), spec, defaults)
            continue
        wanted = [k.filter(keep).to_pylist() for k in keeps]
        for number, (item, row) in enumerate(work_items(part.batch.filter(keep), spec, defaults)):
            for sample, flags in enumerate(wanted):
                if flags[number]:
                    yield sample_of(item, sample, defaults), row
