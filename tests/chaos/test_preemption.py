"""One replica preempted again and again over a run (its worker SIGKILLed after each stretch of
progress, as preemptions over a week would): rebuilt every time, because a rendered unit resets
its count of failures in a row; exit 0, every id once, no row blamed (--max-retries 0)."""

from __future__ import annotations

import pytest

from tests.chaos.workers import preemptions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_one_replica_preempted_ten_times_finishes_every_row_once(tmp_path):
    outcome = preemptions(tmp_path, kills=10, steps=4)
    print(outcome.describe())
    assert outcome.times == 10, outcome.describe()
    assert outcome.ok, outcome.describe()
