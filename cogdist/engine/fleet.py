"""What the driver knows of its replicas and reads off the cluster for the render loop: what a
failed call was, in the failure policy's terms (a worker's error, a dead worker, a lost or
drained node), and what a job that cannot place a gang is waiting for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import ray

from cogdist.engine.plan import ReplicaLayout
from cogdist.errors import ConfigurationError, GangBroken, StorageError
from cogdist.executor.cluster import Node, alive_nodes, node_gone
from cogdist.executor.gang import GangState, ReplicaGang
from cogdist.failures import Failure

_NO_NODE = Node(id="", host="", raylet_port=0, cpus=0.0, gpus=0.0)


@dataclass
class Replica:
    """One gang and what the loop knows of it."""

    index: int
    gang: ReplicaGang
    rebuilds: int = 0
    setup_pending: set[ray.ObjectRef] = field(default_factory=set)
    """The setup calls of its members not yet returned: it is ready when none is left."""
    last_error: str | None = None
    given_up: bool = False
    nodes: set[str] = field(default_factory=set)
    """The Ray nodes its gang was placed on (empty until placed)."""
    draining: bool = False
    """Its node is being drained: it gets no new unit, and moves once its units are done."""
    units: list[int] = field(default_factory=list)
    """The units it has in flight, oldest first."""
    head_since: float = 0.0
    """perf_counter() when its oldest unit became its oldest (submitted to it idle, or the one
    before came back)."""

    @property
    def ready(self) -> bool:
        return self.gang.state == GangState.READY

    @property
    def placed(self) -> bool:
        return bool(self.nodes)


class Waiting(NamedTuple):
    """A call in flight: whose it is, and which unit it renders (None: a member's setup)."""

    replica: Replica
    unit_id: int | None


def classify(error: BaseException, setup: bool, used: set[str], known: dict[str, Node]) -> Failure:
    """What a failed call of a gang was: `setup` whether it was a member's setup, `used` the nodes
    the gang is on, `known` every node seen so far (updated here)."""
    if isinstance(error, ray.exceptions.RayTaskError):  # the worker raised
        if isinstance(error, GangBroken):  # raised as a RayTaskError that is also a GangBroken
            return Failure.COLLECTIVE_BROKEN
        if isinstance(error, StorageError):
            return Failure.STORAGE
        if isinstance(error, ConfigurationError):
            return Failure.SETUP_CONFIG
        if setup:
            return Failure.SETUP_FAILED
        if type(getattr(error, "cause", None)).__name__ == "OutOfMemoryError":
            return Failure.OUT_OF_MEMORY
        return Failure.ROW_ERROR
    if getattr(error, "actor_init_failed", False) and "ModuleNotFoundError" in str(error):
        return Failure.SETUP_CONFIG  # the node cannot import cogdist's worker (its image lacks it)
    # The actor died or became unreachable: its node, or the worker alone?
    nodes = alive_nodes()
    known.update({n.id: n for n in nodes})
    if getattr(error, "preempted", False) or any(known.get(n, _NO_NODE).draining for n in used):
        return Failure.NODE_DRAINED
    if any(node_gone(n, nodes, known) for n in used):
        return Failure.NODE_LOST
    return Failure.WORKER_DIED


def waiting_for(layout: ReplicaLayout, nodes: list[Node]) -> str:
    """`waiting for a node with 4 GPUs for a gang of --sp 4: the cluster has 0 GPUs, at most 0 on
    one node; see `ray status``."""
    if layout.gang.gpus_per_member:
        most = max((n.gpus for n in nodes), default=0)
        have = f"{sum(n.gpus for n in nodes):g} GPUs, at most {most:g} on one node"
    else:
        have = f"at most {max((n.cpus for n in nodes), default=0):g} CPUs on one node"
    return f"waiting for {layout.needs}: the cluster has {have}; see `ray status`"


def all_replicas_lost(replicas) -> str:
    reasons = "\n".join(f"  replica {r.index}: {r.last_error}" for r in replicas)
    return (
        "every replica failed and was given up; the rows not rendered stay pending and a re-run "
        f"resumes them.\n{reasons}"
    )


def short_nodes(nodes: set[str]) -> str:
    return ", ".join(sorted(n[:8] for n in nodes))


def describe_error(error: BaseException) -> str:
    """One readable line (plus detail) for an error raised in a worker."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"[:2000]
    text = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {text[-1] if text else ''}")[:2000]
