"""One replica preempted again and again over a run (its worker SIGKILLed after each stretch of
progress, as preemptions over a week would): rebuilt every time, because a rendered unit resets
its count of failures in a row; exit 0, every id once, no row blamed (--max-retries 0).

OUT is on the S3 server behind a relay that delays every request by 0.3 s, and every kill strikes
while outputs are stored but not committed: the worker stores a unit's outputs in the background
while it renders the next, and a kill then loses only rows that are not indexed."""

from __future__ import annotations

import pytest

from tests.chaos.workers import preemptions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_one_replica_preempted_while_storing_finishes_every_row_once(tmp_path):
    outcome = preemptions(tmp_path, kills=4, steps=4, slow_store=0.3)
    print(outcome.describe())
    assert outcome.times == 4, outcome.describe()  # more than --max-gang-restarts (3) in all
    assert outcome.notes.count("output(s) stored not committed") == 4
    assert outcome.ok, outcome.describe()
