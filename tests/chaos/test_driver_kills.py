"""The driver SIGKILLed 5 times over one job, per store, each kill at a point of its progress drawn
at random — one of every kind: before its first line, job record written, workers starting, a
unit in flight after N rows, just after a commit — then run to completion: every
kill landed, every id indexed once, every output decodable and matching its row, nothing
orphaned. The size users run (50 kills over 500 rows) is `python -m tests.chaos.report`'s."""

from __future__ import annotations

import pytest

from tests.chaos.progress import KILL_KINDS
from tests.chaos.scenarios import driver_kills

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_driver_killed_five_times_then_resumed_indexes_every_id_once(tmp_path, storage):
    outcome = driver_kills(tmp_path, storage, kills=5)
    print(outcome.describe())
    assert outcome.times >= 5, outcome.describe()
    assert all(kind in outcome.notes for kind in KILL_KINDS), outcome.notes  # every kind struck
    assert outcome.ok, outcome.describe()
