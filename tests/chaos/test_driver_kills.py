"""The driver SIGKILLed 10 times over one 120-row job, each kill at a point of its progress drawn
at random (before its first line, job record written, workers starting, a unit in flight after
N rows, just after a commit), then run to completion: every kill landed, every id indexed once,
every output decodable and matching its row, nothing orphaned."""

from __future__ import annotations

import pytest

from tests.chaos.scenarios import driver_kills

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_driver_killed_ten_times_then_resumed_indexes_every_id_once(tmp_path, storage):
    outcome = driver_kills(tmp_path, storage, kills=10, rows=120)
    print(outcome.describe())
    assert outcome.times >= 10, outcome.describe()
    assert outcome.expected >= 100
    assert outcome.ok, outcome.describe()
