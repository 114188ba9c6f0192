"""The failure policy alone: what each failure costs the rows, the replica and the job."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cogdist.errors import EXIT_REFUSED, EXIT_ROWS_FAILED, ConfigurationError, ModelError
from cogdist.failures import (
    Failure,
    FailurePolicy,
    ReplicaAction,
    RowCharge,
    broken_collective,
    configuration_problem,
)


@dataclass
class Row:
    attempts: int = 0
    crashes: int = 0


def test_preemptions_spread_over_a_long_run_never_add_up():
    policy = FailurePolicy(max_gang_restarts=3)
    for _ in range(10):  # ten worker deaths, each after the rebuilt replica rendered a unit
        decision = policy.make_decision(Failure.WORKER_DIED, 0, "actor died")
        assert decision.replica == ReplicaAction.REBUILD and decision.rows == RowCharge.CRASH
        policy.rendered(0)
    assert policy.failures_in_a_row(0) == 0


def test_a_crash_loop_is_given_up_after_max_gang_restarts_in_a_row():
    policy = FailurePolicy(max_gang_restarts=2)
    kinds = [Failure.SETUP_FAILED, Failure.WORKER_DIED, Failure.COLLECTIVE_BROKEN]
    decisions = [policy.make_decision(kind, 1, "boom") for kind in kinds]
    assert [d.replica for d in decisions] == [
        ReplicaAction.REBUILD,
        ReplicaAction.REBUILD,
        ReplicaAction.GIVE_UP,
    ]
    assert "3 failures in a row" in decisions[-1].message
    # Another replica's count is its own.
    assert policy.make_decision(Failure.WORKER_DIED, 2, "x").replica == ReplicaAction.REBUILD


@pytest.mark.parametrize("kind", [Failure.NODE_LOST, Failure.NODE_DRAINED])
def test_a_lost_or_drained_node_is_charged_to_nobody(kind):
    policy = FailurePolicy(max_gang_restarts=1)
    for _ in range(5):
        decision = policy.make_decision(kind, 0, "node gone")
        assert (decision.rows, decision.replica, decision.stop) == (
            RowCharge.FREE,
            ReplicaAction.REBUILD,
            None,
        )
    assert policy.failures_in_a_row(0) == 0
    row = Row()
    assert policy.settle_row(row, RowCharge.FREE, "node gone") is None
    assert (row.attempts, row.crashes) == (0, 0)


def test_a_broken_collective_blames_no_row_but_counts_for_the_replica():
    policy = FailurePolicy()
    decision = policy.make_decision(Failure.COLLECTIVE_BROKEN, 0, "gloo: connection closed")
    assert (decision.rows, decision.replica) == (RowCharge.FREE, ReplicaAction.REBUILD)
    assert policy.failures_in_a_row(0) == 1


def test_configuration_and_storage_failures_stop_the_job_with_their_exit_codes():
    policy = FailurePolicy()
    config = policy.make_decision(Failure.SETUP_CONFIG, 0, "ModuleNotFoundError: No module named 'xformers'")
    assert isinstance(config.stop, ConfigurationError) and config.stop.exit_code == EXIT_REFUSED
    assert "xformers" in str(config.stop) and "rebuilding them would not help" in str(config.stop)
    storage = policy.make_decision(Failure.STORAGE, 0, "could not write s3://b/x")
    assert storage.stop is not None and storage.stop.exit_code == EXIT_ROWS_FAILED
    assert storage.replica == ReplicaAction.KEEP


def test_row_errors_spend_attempts_and_worker_deaths_spend_crashes():
    policy = FailurePolicy(max_retries=1, max_crashes=2)
    for kind in (Failure.ROW_ERROR, Failure.OUT_OF_MEMORY):
        decision = policy.make_decision(kind, 0, "ValueError")
        assert (decision.rows, decision.replica) == (RowCharge.ATTEMPT, ReplicaAction.KEEP)
    row = Row()
    assert policy.settle_row(row, RowCharge.ATTEMPT, "bad") is None
    assert policy.settle_row(row, RowCharge.ATTEMPT, "bad again") == "bad again"
    poison = Row()
    assert policy.settle_row(poison, RowCharge.CRASH, "actor died") is None
    assert "worker died 2 times" in policy.settle_row(poison, RowCharge.CRASH, "actor died")
    assert poison.attempts == 0


def test_the_worker_classifies_its_own_exceptions():
    class DistError(RuntimeError):
        pass

    assert broken_collective(RuntimeError("[gloo] Connection closed by peer"))
    assert broken_collective(DistError("timeout"), (DistError,))
    assert not broken_collective(ValueError("bad prompt"))
    assert configuration_problem(ModuleNotFoundError("No module named 'xformers'"))
    assert configuration_problem(ModelError("no safetensors"))
    assert not configuration_problem(RuntimeError("CUDA error: an illegal memory access"))
