"""Scheduling policy: which rows form the next unit, retries, permanent failures.

Plain Python over a stream of (WorkItem, manifest row): no Ray, no torch, testable alone. Rows
are bucketed by shape (size, frames, steps, guidance) so that a unit is one pipeline call; a
bounded number of rows is buffered, so the stream is pulled only as fast as it is rendered.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from cogdist.failures import FailurePolicy, RowCharge
from cogdist.work import ItemResult, WorkItem, WorkUnit


@dataclass
class Row:
    """A row in the scheduler's care, from the stream until it is finished or failed."""

    item: WorkItem
    manifest_row: dict
    attempts: int = 0
    """Renders that raised an error for this row."""
    crashes: int = 0
    """Renders lost because their worker died."""
    alone: bool = False
    """Render it with nothing else on its replica: its worker died while it and another unit were
    in flight (one storing its outputs, one rendering), so which one killed it is unknown."""


@dataclass(frozen=True)
class Finished:
    """A row rendered and stored, with its worker's result."""

    row: Row
    result: ItemResult


@dataclass(frozen=True)
class Failed:
    """A row that failed for good (retries spent), with its last error."""

    row: Row
    error: str


class Scheduler:
    """The driver's queue of work: streams pending rows, buckets them by shape into units of up to
    `batch_size` rows, hands out units (`next_unit`), and takes back what they did: `complete`
    returns the finished rows and `requeue` takes back a unit that failed; rows are charged and
    their limits applied by the job's FailurePolicy, and those that failed for good are returned.
    `finished` when all is done.
    """

    def __init__(
        self,
        rows: Iterator[tuple[WorkItem, dict]],
        *,
        batch_size: int = 1,
        policy: FailurePolicy | None = None,
        max_buffered: int | None = None,
    ):
        self._stream = rows
        self._stream_done = False
        self.batch_size = batch_size
        self.policy = policy or FailurePolicy()
        self.max_buffered = max_buffered or max(256, 8 * batch_size)
        self._buckets: OrderedDict[tuple, list[Row]] = OrderedDict()
        self._buffered = 0
        self._retries: deque[list[Row]] = deque()
        self._in_flight: dict[int, list[Row]] = {}
        self._ids = itertools.count()
        self._seconds_per_row: dict[tuple, float] = {}  # shape -> moving average of render time

    @property
    def finished(self) -> bool:
        """Nothing buffered, nothing in flight, and the stream is drained."""
        idle = not self._buffered and not self._retries and not self._in_flight
        if idle and not self._stream_done:
            self._pull()  # the stream may end exactly here; find out
        return self._stream_done and not self._buffered and not self._retries and not self._in_flight

    def has_work(self) -> bool:
        """Rows not yet handed out (buffered, retried, or still in the stream)."""
        return bool(self._buffered or self._retries or not self._stream_done)

    def next_unit(self, behind: bool = False) -> WorkUnit | None:
        """The next unit to render, or None when there is nothing to hand out now. `behind`: for a
        replica that holds units already, which cannot take a unit that must render alone."""
        for position, rows in enumerate(self._retries):
            if not (behind and rows[0].alone):
                del self._retries[position]
                return self._issue(rows)
        while True:
            full = next((key for key, rows in self._buckets.items() if len(rows) >= self.batch_size), None)
            if full is not None:
                return self._issue(self._take(full, self.batch_size))
            if self._stream_done or self._buffered >= self.max_buffered:
                break
            self._pull()
        if not self._buckets:
            return None
        # No bucket is full: rather than let a replica idle, hand out the fullest one.
        key = max(self._buckets, key=lambda k: len(self._buckets[k]))
        return self._issue(self._take(key, self.batch_size))

    def alone(self, unit_id: int) -> bool:
        """Whether an issued unit must render with nothing else on its replica."""
        return any(row.alone for row in self._in_flight.get(unit_id, ()))

    def expected_seconds(self, unit_id: int) -> float | None:
        """How long an issued unit should take, from earlier units of its shape (None: no idea yet)."""
        rows = self._in_flight.get(unit_id)
        if not rows:
            return None
        per_row = self._seconds_per_row.get(rows[0].item.shape)
        return None if per_row is None else per_row * len(rows)

    def complete(
        self, unit_id: int, results: tuple[ItemResult, ...], seconds: float | None = None
    ) -> tuple[list[Finished], list[Failed]]:
        """Settle a unit from its rows' results; `seconds` (how long it held the replica's
        renderer, `UnitResult.render_time`) informs expected_seconds."""
        issued = self._in_flight.pop(unit_id)
        if seconds is not None and issued:
            shape, per_row = issued[0].item.shape, seconds / len(issued)
            previous = self._seconds_per_row.get(shape)
            self._seconds_per_row[shape] = per_row if previous is None else 0.7 * previous + 0.3 * per_row
        rows = {row.item.id: row for row in issued}
        finished, failed = [], []
        for result in results:
            row = rows.pop(result.id)
            if result.ok:
                finished.append(Finished(row, result))
            else:
                failed.extend(self._retry([row], RowCharge.ATTEMPT, result.error or "unknown error"))
        # A row the worker did not report on is retried like a failed one.
        failed.extend(
            self._retry(list(rows.values()), RowCharge.ATTEMPT, "worker returned no result for this row")
        )
        return finished, failed

    def requeue(self, unit_id: int, charge: RowCharge, reason: str, alone: bool = False) -> list[Failed]:
        """A unit that did not finish: each row is charged as the policy decided and retried on
        its own (`alone`: on a replica holding nothing else); the rows that failed for good are
        returned."""
        rows = self._in_flight.pop(unit_id)
        for row in rows:
            row.alone = row.alone or alone  # once in doubt, alone until it is settled
        return self._retry(rows, charge, reason)

    # -- internals -------------------------------------------------------------------------

    def _pull(self) -> None:
        try:
            item, manifest_row = next(self._stream)
        except StopIteration:
            self._stream_done = True
            return
        self._buckets.setdefault(item.shape, []).append(Row(item, manifest_row))
        self._buffered += 1

    def _take(self, key: tuple, n: int) -> list[Row]:
        rows = self._buckets[key]
        taken, rest = rows[:n], rows[n:]
        if rest:
            self._buckets[key] = rest
        else:
            del self._buckets[key]
        self._buffered -= len(taken)
        return taken

    def _issue(self, rows: list[Row]) -> WorkUnit:
        unit_id = next(self._ids)
        self._in_flight[unit_id] = rows
        return WorkUnit(unit_id, tuple(row.item for row in rows))

    def _retry(self, rows: list[Row], charge: RowCharge, reason: str) -> list[Failed]:
        failed = []
        for row in rows:
            error = self.policy.settle_row(row, charge, reason)
            if error is None:
                self._retries.append([row])
            else:
                failed.append(Failed(row, error))
        return failed
