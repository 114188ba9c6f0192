"""Gangs: K worker actors in one STRICT_PACK placement group, started, used and killed as one.

Ray has no primitive for actors that fail together, so a ReplicaGang owns its placement group and its
actors (`max_restarts=0`): on any member's death the engine kills the rest, removes the group
and builds a new gang (the pattern of Ray Train's worker group and vLLM's Ray executor). What a
failure costs is decided by cogdist.failures.FailurePolicy.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cogdist.work import WorkUnit


@dataclass(frozen=True)
class GangSpec:
    """The shape of one replica."""

    size: int = 1
    """Workers (GPUs) per gang; sequence-parallel degree times CFG-parallel degree."""
    cpus_per_member: float = 1.0
    gpus_per_member: float = 0.0

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_member}
        if self.gpus_per_member:
            bundle["GPU"] = self.gpus_per_member
        return bundle

    def describe(self) -> str:
        return f"{self.size} x {self.bundle()}"


class GangState(Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"


class ReplicaGang:
    """One replica (driver side): K actors of `worker_class`, ranks 0..K-1, in one placement group.
    Inside the workers the same gang is a `cogdist.parallel.group.GangGroup`."""

    def __init__(
        self, replica: int, spec: GangSpec, worker_class: type, worker_args: tuple[Any, ...], calls: int = 1
    ):
        self.replica = replica
        self.calls = calls
        """Units it is handed at once: each member runs as many calls at a time (a threaded actor),
        so that one renders while the next reads its inputs and the last stores its outputs."""
        self.turns = 0
        """Units submitted to its current actors: the next one's turn."""
        self.spec = spec
        self.worker_class = worker_class
        self.worker_args = worker_args
        self.state = GangState.DEAD
        self.actors: list[Any] = []
        self.group = None
        self.placed: ray.ObjectRef | None = None
        """Resolves once the placement group is placed (one ref per group: each ready() makes one)."""
        self.setup_refs: list[ray.ObjectRef] = []
        self.started_at = 0.0

    def start(self) -> list[ray.ObjectRef]:
        """Reserve the placement group and start the actors; returns the refs of their setup."""
        self.group = placement_group([self.spec.bundle()] * self.spec.size, strategy="STRICT_PACK")
        self.placed = self.group.ready()
        remote_class = ray.remote(self.worker_class)
        self.actors = [
            remote_class.options(
                num_cpus=self.spec.cpus_per_member,
                num_gpus=self.spec.gpus_per_member,
                max_restarts=0,
                max_task_retries=0,
                max_concurrency=self.calls + 1,  # the spare thread: setup, or a stray call
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=rank
                ),
            ).remote(*self.worker_args, rank=rank, world_size=self.spec.size)
            for rank in range(self.spec.size)
        ]
        # Rank 0 picks the process group's address; Ray hands it to every setup call.
        address = self.actors[0].rendezvous.remote() if self.spec.size > 1 else None
        self.setup_refs = [actor.setup.remote(address) for actor in self.actors]
        self.state = GangState.STARTING
        self.turns = 0
        self.started_at = time.monotonic()
        return self.setup_refs

    def placement_ready(self) -> bool:
        if self.group is None:
            return False
        ready, _ = ray.wait([self.placed], timeout=0)
        return bool(ready)

    def node_ids(self) -> set[str]:
        """The Ray nodes its placement group's bundles are on (empty until it is placed)."""
        if self.group is None:
            return set()
        with contextlib.suppress(Exception):
            table = placement_group_table(self.group)
            return {node for node in table.get("bundles_to_node_id", {}).values() if node}
        return set()

    def total_bundle(self) -> dict[str, float]:
        """The whole gang as one bundle: what a node must hold (an autoscaler request)."""
        return {name: amount * self.spec.size for name, amount in self.spec.bundle().items()}

    def submit(self, unit: WorkUnit) -> ray.ObjectRef:
        """Every rank gets the unit, numbered with its turn; rank 0's result is the unit's result."""
        unit = replace(unit, turn=self.turns)
        self.turns += 1
        refs = [actor.render.remote(unit) for actor in self.actors]
        return refs[0]

    def kill(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(actor, no_restart=True)
        if self.group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.group)
        self.actors, self.group, self.placed, self.setup_refs = [], None, None, []
        self.state = GangState.DEAD
