"""The failure policy: every decision about what a failure costs, in one place.

The render loop reports what happened (`Failure`: a row's error, a worker that died on a live
node, a node lost or drained, a broken collective, running out of memory, a storage error, a
setup that failed on configuration or otherwise) and acts on the `FailureDecision` that
`FailurePolicy.make_decision` returns, as Ray Train v2's `FailurePolicy.make_decision` does: the
rows are charged (an attempt, a crash) or re-queued free, the replica is kept, rebuilt or given
up, or the job stops. `settle_rows` applies the rows' limits. Plain Python, no Ray: the worker
classifies its own exceptions here too (`broken_collective`, `configuration_problem`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from cogdist.errors import CogdistError, ConfigurationError, StorageError


class Failure(Enum):
    """What happened, as the loop saw it."""

    ROW_ERROR = "row error"
    """A row's render raised (or its input could not be read): the row's fault, maybe."""
    OUT_OF_MEMORY = "out of memory"
    """The render ran out of device memory, after the worker's own memory-saving retry."""
    WORKER_DIED = "worker died"
    """A member of the gang died on a node that is still alive (a crash, an OOM kill, a SIGKILL)."""
    NODE_LOST = "node lost"
    """A member's node died or left the cluster (a preempted VM, a deleted pod)."""
    NODE_DRAINED = "node drained"
    """A member's node was drained (`ray drain-node`, a spot notice) and went away."""
    COLLECTIVE_BROKEN = "collective broken"
    """A collective of the gang failed or timed out: a peer is gone or hung."""
    STORAGE = "storage error"
    """A worker could not store an output for --storage-timeout: OUT is unreachable."""
    SETUP_CONFIG = "setup failed on configuration"
    """A member's setup failed on something no rebuild fixes: a missing package, a bad checkpoint."""
    SETUP_FAILED = "setup failed"
    """A member's setup failed otherwise (it may work on another try or another node)."""


class RowCharge(Enum):
    ATTEMPT = "attempt"
    """The row's error: charged an attempt (--max-retries)."""
    CRASH = "crash"
    """Its worker died under it: charged a crash (the poison-row rule)."""
    FREE = "free"
    """Not the row's fault: re-queued uncharged."""


class ReplicaAction(Enum):
    KEEP = "keep"
    REBUILD = "rebuild"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class FailureDecision:
    """What the loop does about one failure."""

    rows: RowCharge
    """How the rows the failure touched are charged before they are retried."""
    replica: ReplicaAction
    stop: CogdistError | None = None
    """Stop the job with this error, whose exit code the CLI returns (finished rows stay indexed;
    the same command resumes)."""
    message: str = ""
    """What the loop tells the user."""


class ChargedRow(Protocol):
    """What the policy reads and counts on a row (cogdist.scheduler.Row)."""

    attempts: int
    crashes: int


@dataclass
class FailurePolicy:
    """The rules of failure, one place: rows are retried `max_retries` times after their own
    errors and `max_crashes` times after their worker died under them; a replica is rebuilt until
    it has failed `max_gang_restarts` times in a row (a rendered unit resets the count, so
    preemptions spread over a week never add up); a lost or drained node is charged to nobody; a
    setup that fails on configuration stops the job (exit 2); an unreachable OUT stops it (exit 1)."""

    max_retries: int = 2
    max_gang_restarts: int = 3
    max_crashes: int = 3
    consecutive: dict[int, int] = field(default_factory=dict)
    """Replica -> its failures since it last rendered a unit."""

    def make_decision(self, failure: Failure, replica: int, reason: str) -> FailureDecision:
        if failure in (Failure.ROW_ERROR, Failure.OUT_OF_MEMORY):
            return FailureDecision(RowCharge.ATTEMPT, ReplicaAction.KEEP)
        if failure == Failure.STORAGE:
            return FailureDecision(
                RowCharge.FREE,
                ReplicaAction.KEEP,
                stop=StorageError(
                    f"stopped: OUT cannot be written ({reason}). Rows finished so far are in the "
                    "index; run the same command again to resume once the store is reachable."
                ),
            )
        if failure == Failure.SETUP_CONFIG:
            return FailureDecision(
                RowCharge.FREE,
                ReplicaAction.GIVE_UP,
                stop=ConfigurationError(
                    f"stopped: replica {replica}'s workers cannot start, and rebuilding them would not "
                    f"help: {reason}. Fix it and run the same command again; rows finished so far are indexed."
                ),
            )
        if failure in (Failure.NODE_LOST, Failure.NODE_DRAINED):
            # Charged to nobody: the replica is rebuilt where (and when) the cluster has room.
            return FailureDecision(
                RowCharge.FREE,
                ReplicaAction.REBUILD,
                message=f"replica {replica}: {failure.value} ({reason}); rebuilding it when the cluster "
                "has room (not counted against --max-gang-restarts)",
            )
        rows = RowCharge.CRASH if failure == Failure.WORKER_DIED else RowCharge.FREE
        count = self.consecutive.get(replica, 0) + 1
        self.consecutive[replica] = count
        if count > self.max_gang_restarts:
            return FailureDecision(
                rows,
                ReplicaAction.GIVE_UP,
                message=f"replica {replica} given up after {count} failures in a row "
                f"(--max-gang-restarts {self.max_gang_restarts}): {reason}",
            )
        return FailureDecision(
            rows,
            ReplicaAction.REBUILD,
            message=f"replica {replica} lost ({reason}); rebuilding it "
            f"({count}/{self.max_gang_restarts} in a row)",
        )

    def rendered(self, replica: int) -> None:
        """The replica rendered a unit: it is healthy again."""
        self.consecutive.pop(replica, None)

    def failures_in_a_row(self, replica: int) -> int:
        return self.consecutive.get(replica, 0)

    def settle_row(self, row: ChargedRow, charge: RowCharge, reason: str) -> str | None:
        """Charge one row; the error it fails with for good, or None to retry it."""
        if charge == RowCharge.ATTEMPT:
            row.attempts += 1
            return reason if row.attempts > self.max_retries else None
        if charge == RowCharge.CRASH:
            row.crashes += 1
            if row.crashes >= self.max_crashes:
                return f"worker died {row.crashes} times while rendering this row: {reason}"
        return None


# -- what a worker's exception was ---------------------------------------------------------

# How torch reports a failed gloo/NCCL collective when it raises a plain RuntimeError.
_COLLECTIVE_WORDS = (
    "gloo",
    "NCCL",
    "Connection closed by peer",
    "Connection reset by peer",
    "caused pair closure",  # gloo, on a pair an earlier timeout closed
)


def broken_collective(error: BaseException, collective_errors: Iterable[type] = ()) -> bool:
    """Whether a gang member's exception means a collective failed (a peer gone or hung)."""
    return isinstance(error, tuple(collective_errors)) or any(
        word in str(error) for word in _COLLECTIVE_WORDS
    )


def configuration_problem(error: BaseException) -> bool:
    """Whether a setup failure is one that no rebuild can fix: a package that is not installed
    (ImportError), or a checkpoint or option refused by cogdist's own checks."""
    from cogdist.errors import ModelError, UsageError

    return isinstance(error, (ImportError, ModelError, UsageError))
