"""Background I/O in a worker: a unit renders while the one before it stores its outputs, in the
driver's order, with the bytes waiting to be stored bounded. The parts alone (threads, no model),
then one in-process worker whose store holds a write back until the test lets it go."""

from __future__ import annotations

import threading
import time

import pytest

from cogdist.failures import FailurePolicy, RowCharge
from cogdist.scheduler import Scheduler
from cogdist.work import ItemResult, UnitResult, WorkItem, WorkUnit
from cogdist.worker.overlap import OutputBuffer, Turnstile
from tests.inprocess import in_process_worker

BOUND = 120.0  # seconds a test waits for an event before it fails: a bound, not a pace


def test_the_turnstile_lets_units_render_in_the_drivers_order_whatever_order_calls_come_in():
    turnstile, entered = Turnstile(), []

    def call(turn: int) -> None:
        with turnstile.turn(turn):
            entered.append(turn)

    threads = [threading.Thread(target=call, args=(turn,)) for turn in (3, 1, 2, 0)]
    for thread in threads:
        thread.start()
        time.sleep(0.01)  # only makes the wrong order likelier; the order never depends on it
    for thread in threads:
        thread.join(BOUND)
    assert entered == [0, 1, 2, 3]


def test_the_turnstile_lets_a_turn_that_raised_pass_to_the_next():
    turnstile = Turnstile()
    with pytest.raises(ValueError), turnstile.turn(0):
        raise ValueError("a render that failed")
    done = threading.Event()

    def next_turn() -> None:
        with turnstile.turn(1):
            done.set()

    threading.Thread(target=next_turn).start()
    assert done.wait(BOUND), "turn 1 waited forever behind a turn that raised"


def test_the_output_buffer_holds_back_what_does_not_fit_and_always_admits_one_unit():
    buffer = OutputBuffer(capacity=100)
    buffer.hold(500)  # larger than the buffer, but nothing else is held
    admitted = threading.Event()
    thread = threading.Thread(target=lambda: (buffer.hold(10), admitted.set()))
    thread.start()
    assert not admitted.wait(0.2), "a unit was admitted over the buffer's capacity"
    buffer.release(500)
    assert admitted.wait(BOUND)
    assert buffer.held == 10


def test_a_unit_lost_beside_another_is_charged_only_once_it_renders_alone():
    """Two units in flight when their worker died: which one killed it is unknown (one may have
    been storing its outputs while the other rendered), so neither is charged; each renders again
    on a replica holding nothing else, where a death is charged to it."""
    items = [(WorkItem(f"r{i}", "p", None, i, 64, 64, 4, 5.0, None, f"o/r{i}.png"), {}) for i in range(3)]
    scheduler = Scheduler(iter(items), policy=FailurePolicy(max_retries=0, max_crashes=1))
    first, second = scheduler.next_unit(), scheduler.next_unit()
    for unit in (first, second):
        assert scheduler.requeue(unit.unit_id, RowCharge.FREE, "actor died", alone=True) == []
    behind = scheduler.next_unit(behind=True)  # a busy replica gets only a row that may share it
    assert [i.id for i in behind.items] == ["r2"] and not scheduler.alone(behind.unit_id)
    assert scheduler.next_unit(behind=True) is None
    retry = scheduler.next_unit()
    assert [i.id for i in retry.items] == ["r0"] and scheduler.alone(retry.unit_id)
    [failed] = scheduler.requeue(retry.unit_id, RowCharge.CRASH, "actor died")
    assert failed.row.item.id == "r0" and "died" in failed.error


class HeldStore:
    """The worker's real store, with writes of chosen outputs held until `release`."""

    def __init__(self, location, held: set[str]):
        self.location, self.held = location, held
        self.writing, self.release = threading.Event(), threading.Event()
        self.held_since = 0.0

    def __getattr__(self, name):
        return getattr(self.location, name)

    def write_bytes(self, rel: str, data: bytes, **kwargs) -> None:
        if rel in self.held:
            self.held_since = time.perf_counter()
            self.writing.set()
            assert self.release.wait(BOUND), "the test never released the write"
        self.location.write_bytes(rel, data, **kwargs)


def test_the_driver_learns_a_units_render_time_not_its_storing():
    """A unit that stored its outputs for 5 s behind 0.5 s of rendering is expected to take 0.5 s
    the next time (storing runs behind the next render, so a slow store keeps the queue full);
    one whose rows failed before the pipeline counts its wall time."""
    stored_slowly = UnitResult(
        1,
        (
            ItemResult("a", ok=True, render_seconds=0.2, compile_seconds=0.1, io_seconds=5.0),
            ItemResult("b", ok=True, render_seconds=0.2, io_seconds=5.0),
        ),
        seconds=5.5,
    )
    assert stored_slowly.render_time == pytest.approx(0.5)
    items = [(WorkItem(f"r{i}", "p", None, i, 64, 64, 4, 5.0, None, f"o/r{i}.png"), {}) for i in range(4)]
    scheduler = Scheduler(iter(items), batch_size=2)
    first, second = scheduler.next_unit(), scheduler.next_unit()
    done = (ItemResult("r0", ok=True), ItemResult("r1", ok=True))
    scheduler.complete(first.unit_id, done, stored_slowly.render_time)
    assert scheduler.expected_seconds(second.unit_id) == pytest.approx(0.5)  # 0.25 s a row, 2 rows
    failed_early = UnitResult(2, (ItemResult("c", ok=False, error="unreadable input"),), seconds=0.3)
    assert failed_early.render_time == pytest.approx(0.3)


def test_the_next_unit_renders_while_the_last_stores_and_a_slow_store_holds_renders_back(tmp_path):
    rows = [{"id": f"bg/{i}", "prompt": f"scene {i}", "seed": i} for i in range(3)]
    worker, job, pending = in_process_worker(rows, "tiny-cogview4", tmp_path / "out", threads=1)
    worker.setup()
    items = [item for item, _ in pending]
    store = HeldStore(worker.out, {items[0].output})
    worker.out = store
    worker.buffer = OutputBuffer(capacity=1)  # one unit's pixels fill it
    events: list[str] = []
    rendered = {i: threading.Event() for i in range(3)}
    render_pixels, took = worker.render_pixels, {}

    def logged_render_pixels(unit, prepared):
        events.append(f"render {unit.unit_id}")
        start = time.perf_counter()
        result = render_pixels(unit, prepared)
        took[unit.unit_id] = time.perf_counter() - start
        rendered[unit.unit_id].set()
        return result

    worker.render_pixels = logged_render_pixels
    results: dict[int, object] = {}

    def call(number: int) -> None:
        results[number] = worker.render(WorkUnit(number, (items[number],), turn=number))

    threads = [threading.Thread(target=call, args=(n,)) for n in (2, 1, 0)]
    for thread in threads:
        thread.start()
    assert store.writing.wait(BOUND), "unit 0 never stored its output"
    assert rendered[1].wait(BOUND), "unit 1 did not render while unit 0's output was being stored"
    # Unit 0 is not finished while its output is unstored, and the buffer holds unit 2 back.
    assert 0 not in results and not job.out.exists(items[0].output)
    assert "render 2" not in events
    events.append("released")
    held_for = time.perf_counter() - store.held_since
    store.release.set()
    for thread in threads:
        thread.join(BOUND)
    assert events == ["render 0", "render 1", "released", "render 2"]
    for number in range(3):
        [result] = results[number].items
        assert result.ok and job.out.exists(items[number].output)
        assert 0 < result.render_seconds <= took[number] and result.io_seconds > 0
    # Unit 0's I/O time holds the time its write was held back; its render time does not.
    assert results[0].items[0].io_seconds >= held_for
