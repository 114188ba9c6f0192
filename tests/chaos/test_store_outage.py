"""The object store stopped and restarted mid-run: writes retried through it; and one down for
longer than --storage-timeout: the run stops with a clear message and the same command resumes."""

from __future__ import annotations

import pytest

from tests.chaos.outage import storage_outage, storage_outage_stops


@pytest.mark.e2e
def test_a_store_restarted_mid_run_is_waited_for_and_nothing_is_lost_or_truncated(tmp_path):
    outcome = storage_outage(tmp_path)
    print(outcome.describe())
    assert outcome.times == 2
    assert outcome.ok, outcome.describe()
    assert "reported retrying" in outcome.notes and " 0 reads/writes" not in outcome.notes


@pytest.mark.e2e
def test_a_store_down_longer_than_the_timeout_stops_the_run_and_the_same_command_resumes(tmp_path):
    outcome = storage_outage_stops(tmp_path)
    print(outcome.describe())
    assert outcome.ok, outcome.describe()
    assert "stopped:" in outcome.notes
