"""What a report says, as plain numbers from OUT's index, failure records and job record."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogdist.errors import UsageError
from cogdist.sink.job import JOB_RECORD
from cogdist.sink.journal import done_schema, read_done
from cogdist.sink.ledger import FAILURES, read_table
from cogdist.storage import Location

IDLE_GAP_SECONDS = 300.0
"""A replica that finished nothing for longer than this was stopped (between resumed runs, or
while it was rebuilt): the pause ends one span of activity and is not counted as idle time."""
UNIT_TOLERANCE_SECONDS = 0.05
"""Rows of one replica finished this close together came back in one unit (a batch)."""
_NICE_BIN_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass(frozen=True)
class ReplicaBusy:
    replica: int
    rows: int
    busy_seconds: float
    """The sum of its rows' render_seconds."""
    active_seconds: float
    """The length of its spans of activity (see `replica_busy`)."""
    spans: int

    @property
    def fraction(self) -> float:
        # Timestamps are stored to the millisecond: a replica that never waited can come out a
        # hair above 1.
        return min(1.0, self.busy_seconds / self.active_seconds) if self.active_seconds > 0 else 1.0


@dataclass(frozen=True)
class FailureReason:
    reason: str
    """The first line of the error, trimmed."""
    ids: list[str]
    """Every failed id with this reason, sorted."""


def work_units(finished: np.ndarray, seconds: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) of the units one replica rendered, from its rows' finished_at (epoch seconds)
    and render_seconds.

    The rows of a unit (a batch) share its time and are recorded together, so a unit starts its
    rows' summed render time before they finished.
    """
    units: list[list[float]] = []  # [end, busy]
    for end, busy in sorted(zip(finished.tolist(), seconds.tolist())):
        if units and end - units[-1][0] <= UNIT_TOLERANCE_SECONDS:
            units[-1][0] = end
            units[-1][1] += busy
        else:
            units.append([end, busy])
    return [(end - busy, end) for end, busy in units]


def active_spans(intervals: list[tuple[float, float]], idle_gap: float) -> list[tuple[float, float]]:
    """Merge work intervals into spans of activity; a pause longer than `idle_gap` starts a new one."""
    spans: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if spans and start - spans[-1][1] <= idle_gap:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def replica_busy(
    finished: np.ndarray,
    seconds: np.ndarray,
    replicas: np.ndarray,
    idle_gap: float = IDLE_GAP_SECONDS,
    io: np.ndarray | None = None,
) -> list[ReplicaBusy]:
    """Per replica: busy (summed render_seconds) and active time (its spans: from the start of its
    first unit to the end of its last, split wherever it paused longer than `idle_gap`). A unit
    starts its rows' render and I/O time (`io`: io_seconds) before they finished: its reading,
    encoding and storing overlap other units' renders, so they count as active, not busy."""
    whole = seconds if io is None else seconds + io
    result = []
    for replica in sorted(set(replicas.tolist())):
        mine = replicas == replica
        spans = active_spans(work_units(finished[mine], whole[mine]), idle_gap)
        result.append(
            ReplicaBusy(
                replica=int(replica),
                rows=int(mine.sum()),
                busy_seconds=float(seconds[mine].sum()),
                active_seconds=sum(end - start for start, end in spans),
                spans=len(spans),
            )
        )
    return result


def throughput_bins(finished: np.ndarray, active_seconds: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(bin width in seconds, bin starts, rows finished in each): about 40 bins over the active time,
    of a round width; bins in which nothing finished are left out."""
    width = next((b for b in _NICE_BIN_SECONDS if b >= active_seconds / 40), _NICE_BIN_SECONDS[-1])
    starts, counts = np.unique(np.floor(finished / width) * width, return_counts=True)
    return width, starts, counts


def failure_reasons(failures: pa.Table | None, done: pa.Array) -> list[FailureReason]:
    """Failed ids grouped by the first line of their latest error; ids since done are left out."""
    if failures is None or failures.num_rows == 0:
        return []
    failures = failures.filter(pc.invert(pc.is_in(failures["id"], value_set=done)))
    latest: dict[str, str] = {}
    for row in failures.sort_by("failed_at").to_pylist():
        latest[row["id"]] = row["error"]
    by_reason: dict[str, list[str]] = {}
    for item_id, error in latest.items():
        lines = (error or "").strip().splitlines()
        by_reason.setdefault(lines[0].strip() if lines else "(no message)", []).append(item_id)
    reasons = [FailureReason(reason, sorted(ids)) for reason, ids in by_reason.items()]
    return sorted(reasons, key=lambda r: (-len(r.ids), r.reason))


def pick_samples(ids: list[str], count: int) -> list[str]:
    """A deterministic sample: the `count` ids of smallest sha256. It changes only by new ids as a
    job grows, and spreads over the manifest whatever its order."""
    return sorted(ids, key=lambda item_id: hashlib.sha256(item_id.encode("utf-8")).digest())[:count]


@dataclass(frozen=True)
class JobData:
    out: str
    settings: dict
    created_at: str | None
    finished: np.ndarray
    """finished_at of every done row, in epoch seconds."""
    seconds: np.ndarray
    """render_seconds of every done row."""
    io: np.ndarray
    """io_seconds of every done row (0 where an index written before cogdist recorded it)."""
    replicas: np.ndarray | None
    """replica of every done row; None for an index written before cogdist recorded it."""
    ids: list[str]
    reasons: list[FailureReason]
    nodes: dict[str, int] = field(default_factory=dict)
    """Done rows per Ray node that rendered them (empty for an index without the `node` column)."""

    @property
    def done(self) -> int:
        return len(self.ids)

    @property
    def failed(self) -> int:
        return sum(len(r.ids) for r in self.reasons)

    def units(self) -> list[tuple[float, float]]:
        whole = self.seconds + self.io
        if self.replicas is None:  # no way to tell which rows were a batch: one row, one unit
            return list(zip((self.finished - whole).tolist(), self.finished.tolist()))
        return [
            unit
            for replica in set(self.replicas.tolist())
            for unit in work_units(self.finished[self.replicas == replica], whole[self.replicas == replica])
        ]


def read_job(location: Location) -> JobData:
    if not location.exists(JOB_RECORD):
        raise UsageError(
            f"{location.public_uri} holds no cogdist job (no {JOB_RECORD}): give the --out folder of a render"
        )
    record = json.loads(location.read_bytes(JOB_RECORD))
    schema = done_schema(location)
    columns = ["id", "finished_at", "render_seconds"]
    extra = [
        name for name in ("replica", "node", "io_seconds") if schema is not None and name in schema.names
    ]
    has_replicas = "replica" in extra
    table = read_done(location, columns + extra)
    if table is None:
        table = pa.table(
            {
                "id": pa.array([], pa.string()),
                "finished_at": pa.array([], pa.timestamp("ms", tz="UTC")),
                "render_seconds": pa.array([], pa.float64()),
            }
        )
    ids = table["id"].cast(pa.string())
    finished = table["finished_at"].cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
    replicas = None
    if has_replicas and table["replica"].null_count < table.num_rows:
        # Rows committed before the column existed (an older run, resumed) join replica -1.
        replicas = table["replica"].fill_null(-1).to_numpy()
    return JobData(
        out=location.public_uri,
        settings=record.get("settings", {}),
        created_at=record.get("created_at"),
        finished=finished.to_numpy().astype(float) / 1000.0,
        seconds=table["render_seconds"].fill_null(0.0).to_numpy().astype(float),
        io=_zero_if_absent(table, "io_seconds"),
        replicas=replicas,
        ids=ids.to_pylist(),
        reasons=failure_reasons(read_table(location, FAILURES), ids.combine_chunks()),
        nodes=_counts(table["node"]) if "node" in table.column_names else {},
    )


def _zero_if_absent(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows)
    return table[name].fill_null(0.0).to_numpy().astype(float)


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    """How often each non-null value occurs, most often first."""
    counts = column.drop_null().value_counts().to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}


@dataclass(frozen=True)
class Summary:
    """The header's numbers."""

    first_start: float
    last_finish: float
    active_seconds: float
    sessions: int


def summarize(job: JobData, idle_gap: float) -> Summary | None:
    if job.done == 0:
        return None
    sessions = active_spans(job.units(), idle_gap)
    return Summary(
        first_start=min(start for start, _ in sessions),
        last_finish=max(end for _, end in sessions),
        active_seconds=sum(end - start for start, end in sessions),
        sessions=len(sessions),
    )
