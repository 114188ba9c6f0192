"""The kill points of the chaos harness: a watcher sees a job's commits and unindexed outputs in a
real OUT, and each point strikes only at its state of progress, never on a clock."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pyarrow as pa

from cogdist.sink.journal import IndexWriter
from cogdist.sink.naming import output_path
from cogdist.storage import open_location
from tests.chaos.progress import COMMIT, LAUNCH, RENDER, SCANNED, STARTING, KillPlan, KillPoint, Watcher

SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("path", pa.string())])


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def commit(writer: IndexWriter, location, ids: list[str], final: bool = False) -> None:
    for item_id in ids:
        location.write_bytes(output_path(item_id, "png"), b"png")
    writer.add([{"id": i, "path": output_path(i, "png")} for i in ids])
    writer.commit(final=final)


def test_a_plan_covers_every_point_in_fixed_shares_and_says_how_many_rows_it_needs():
    plan = KillPlan.random(10, random.Random(3))
    assert Counter(p.kind for p in plan.points) == {LAUNCH: 1, SCANNED: 1, STARTING: 2, RENDER: 3, COMMIT: 3}
    assert all(1 <= p.rows <= 3 for p in plan.points if p.kind in (RENDER, COMMIT))
    assert plan.rows_needed(10) == sum(p.rows + 10 for p in plan.points if p.kind in (RENDER, COMMIT)) + 1
    assert [p.describe() for p in plan.points] == [
        p.describe() for p in KillPlan.random(10, random.Random(3)).points
    ]
    for kills, counts in {5: (1, 1, 1, 1, 1), 7: (1, 1, 1, 2, 2), 50: (5, 5, 10, 15, 15)}.items():
        plan = KillPlan.random(kills, random.Random(kills))
        assert Counter(p.kind for p in plan.points) == dict(
            zip((LAUNCH, SCANNED, STARTING, RENDER, COMMIT), counts)
        )


def test_points_strike_at_their_state_of_the_job(tmp_path):
    location = open_location(str(tmp_path / "out"))
    log = tmp_path / "driver.log"
    clock = Clock()
    earlier = IndexWriter(location, SCHEMA, commit_interval=2.0, clock=clock)
    commit(earlier, location, ["old/0", "old/1"], final=True)  # an earlier attempt's rows
    location.write_bytes(output_path("old/2", "png"), b"png")  # ... and an output it never indexed

    time.sleep(0.02)  # file times come from a coarse clock: let it tick past the earlier attempt
    watcher = Watcher(location, log=log)  # a new attempt, launched now
    assert KillPoint(LAUNCH).reached(watcher) == "before its first line"
    assert KillPoint(SCANNED).reached(watcher) is None
    log.write_text("cogdist: 5 rows in manifest\n")
    assert KillPoint(SCANNED).reached(watcher).startswith("first line printed")

    writer = IndexWriter(location, SCHEMA, commit_interval=2.0, clock=clock)
    commit(writer, location, ["new/0"])  # into the journal: committed, not in index/ yet
    watcher.look()
    assert (watcher.commits, watcher.new_rows, watcher.grew, watcher.changed) == (1, 1, False, True)
    assert KillPoint(COMMIT, rows=1).reached(watcher) is None  # COMMIT waits for a fold
    assert KillPoint(STARTING).reached(watcher).startswith("missed the start")
    clock.now += 2.0
    writer.commit()  # the fold: the journal's rows become an index part
    watcher.look()
    assert (watcher.commits, watcher.new_rows, watcher.grew) == (2, 1, True)
    assert KillPoint(COMMIT, rows=2).reached(watcher) is None  # too few rows of this attempt yet
    assert KillPoint(COMMIT, rows=1).reached(watcher) == "just after a fold into index/, 3 committed"
    watcher.look()
    assert not watcher.grew and KillPoint(COMMIT, rows=1).reached(watcher) is None  # no new commit

    # Outputs stored since the last commit, by this attempt, and not indexed: what RENDER needs
    # (besides a worker in `render`, which a watcher without a session never sees).
    assert watcher.unindexed_outputs() == 0  # old/2 predates this attempt
    time.sleep(0.02)
    location.write_bytes(output_path("new/1", "png"), b"png")
    assert watcher.unindexed_outputs() == 1
    assert KillPoint(RENDER, rows=1).reached(watcher) is None


def test_the_report_tables_each_scenario_under_every_condition_it_ran_in(tmp_path):
    from tests.chaos.harness import Outcome
    from tests.chaos.report import conditions, render_doc

    def run(times: int, lost: int = 0) -> dict:
        outcome = Outcome("driver-kills-local", "SIGKILL", times, 74, 74 - lost, 0, lost, 0, seconds=150)
        return {**outcome.to_dict(), "steps": 24}

    main = tmp_path / "reliability.json"
    main.write_text(json.dumps({"scenarios": [run(10)]}))
    (tmp_path / "reliability_steps6.json").write_text(
        json.dumps({"label": "--steps 6", "scenarios": [run(10, lost=1)]})
    )
    doc = render_doc([run(10)], conditions(main))
    assert "| scenario | --steps 24 (this document) | --steps 6 |" in doc
    # a failure under another condition is shown as one, not averaged away
    assert "| driver-kills-local | pass, 10 landed, 150 s | **FAIL**, 10 landed, 150 s |" in doc
    assert "## Faster and slower machines" not in render_doc([run(10)], [])
