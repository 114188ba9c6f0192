"""The scheduling policy alone: bucketing, bounded buffering, retries, failures."""

from __future__ import annotations

import pytest

from cogdist.failures import FailurePolicy, RowCharge
from cogdist.scheduler import Scheduler
from cogdist.work import ItemResult, WorkItem


def item(i: int, width: int = 64, steps: int = 4) -> tuple[WorkItem, dict]:
    w = WorkItem(f"r{i}", "p", None, i, width, 64, steps, 5.0, None, f"outputs/r{i}.png")
    return w, {"id": w.id}


def ok(unit) -> tuple[ItemResult, ...]:
    return tuple(ItemResult(i.id, ok=True) for i in unit.items)


def test_units_hold_one_shape_and_at_most_batch_size_rows():
    rows = [item(i, width=64 if i % 2 else 128) for i in range(10)]
    scheduler = Scheduler(iter(rows), batch_size=3)
    units = []
    while (unit := scheduler.next_unit()) is not None:
        units.append(unit)
    assert sum(len(u.items) for u in units) == 10
    for unit in units:
        assert len({i.shape for i in unit.items}) == 1
        assert len(unit.items) <= 3
    assert sorted(i.id for u in units for i in u.items) == sorted(r[0].id for r in rows)


def test_stream_is_pulled_lazily_and_buffer_is_bounded():
    pulled = []

    def stream():
        for i in range(100_000):
            pulled.append(i)
            yield item(i, width=64 + 32 * (i % 7))

    scheduler = Scheduler(stream(), batch_size=4, max_buffered=50)
    unit = scheduler.next_unit()
    assert unit is not None and len(unit.items) == 4
    assert len(pulled) <= 50


def test_partial_bucket_is_handed_out_rather_than_idle():
    scheduler = Scheduler(iter([item(0), item(1, width=96)]), batch_size=8)
    first, second = scheduler.next_unit(), scheduler.next_unit()
    assert len(first.items) == 1 and len(second.items) == 1
    assert scheduler.next_unit() is None


def test_failed_row_is_retried_alone_then_recorded():
    scheduler = Scheduler(iter([item(0), item(1)]), batch_size=2, policy=FailurePolicy(max_retries=1))
    unit = scheduler.next_unit()
    finished, failed = scheduler.complete(
        unit.unit_id, (ItemResult("r0", ok=True), ItemResult("r1", ok=False, error="boom"))
    )
    assert [f.row.item.id for f in finished] == ["r0"] and not failed
    retry = scheduler.next_unit()
    assert [i.id for i in retry.items] == ["r1"]
    finished, failed = scheduler.complete(retry.unit_id, (ItemResult("r1", ok=False, error="boom again"),))
    assert not finished and [(f.row.item.id, f.error, f.row.attempts) for f in failed] == [
        ("r1", "boom again", 2)
    ]
    assert scheduler.finished


def test_unit_exception_splits_the_batch():
    scheduler = Scheduler(
        iter([item(i) for i in range(3)]), batch_size=3, policy=FailurePolicy(max_retries=2)
    )
    unit = scheduler.next_unit()
    assert scheduler.requeue(unit.unit_id, RowCharge.ATTEMPT, "RuntimeError: x") == []
    retries = [scheduler.next_unit() for _ in range(3)]
    assert all(len(u.items) == 1 for u in retries)
    for u in retries:
        scheduler.complete(u.unit_id, ok(u))
    assert scheduler.finished


def test_lost_units_are_requeued_without_charging_an_attempt():
    scheduler = Scheduler(iter([item(0)]), batch_size=1, policy=FailurePolicy(max_retries=0, max_crashes=3))
    for _ in range(2):
        unit = scheduler.next_unit()
        assert scheduler.requeue(unit.unit_id, RowCharge.CRASH, "actor died") == []
    unit = scheduler.next_unit()
    failed = scheduler.requeue(unit.unit_id, RowCharge.CRASH, "actor died")
    assert len(failed) == 1 and "died 3 times" in failed[0].error and failed[0].row.attempts == 0
    assert scheduler.finished


def test_tasks_and_strengths_never_share_a_unit():
    base = WorkItem("t", "p", None, 1, 64, 64, 4, 6.0, 9, "o.mp4", task="text-to-video")
    variants = [
        base,
        WorkItem(
            "v", "p", None, 2, 64, 64, 4, 6.0, 9, "o.mp4", task="video-to-video", video="/a.mp4", strength=0.8
        ),
        WorkItem(
            "w", "p", None, 3, 64, 64, 4, 6.0, 9, "o.mp4", task="video-to-video", video="/a.mp4", strength=0.5
        ),
        WorkItem("f", "p", None, 4, 64, 64, 4, 6.0, 17, "o.mp4", task="text-to-video"),
        WorkItem("t2", "p", None, 5, 64, 64, 4, 6.0, 9, "o.mp4", task="text-to-video"),
    ]
    scheduler = Scheduler(iter([(v, {"id": v.id}) for v in variants]), batch_size=8)
    units = []
    while (unit := scheduler.next_unit()) is not None:
        units.append(sorted(i.id for i in unit.items))
    assert sorted(units) == [["f"], ["t", "t2"], ["v"], ["w"]]


def test_expected_seconds_learn_per_shape_from_finished_units():
    rows = [item(i, width=64) for i in range(3)] + [item(9, width=128)]
    scheduler = Scheduler(iter(rows), batch_size=1)
    first = scheduler.next_unit()
    assert scheduler.expected_seconds(first.unit_id) is None  # nothing known yet
    scheduler.complete(first.unit_id, ok(first), seconds=2.0)
    second = scheduler.next_unit()
    assert scheduler.expected_seconds(second.unit_id) == 2.0
    scheduler.complete(second.unit_id, ok(second), seconds=1.0)
    third = scheduler.next_unit()
    assert scheduler.expected_seconds(third.unit_id) == pytest.approx(0.7 * 2.0 + 0.3 * 1.0)
    other = scheduler.next_unit()
    assert other.items[0].width == 128 and scheduler.expected_seconds(other.unit_id) is None
