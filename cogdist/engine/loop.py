"""The replica loop, run in the driver: keeps every gang busy, retries failed rows, rebuilds a
replica whose workers die, and hands finished rows to the job's Sink."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import ray

from cogdist.engine.plan import Plan, replica_layout, worker_settings
from cogdist.errors import GangBroken, GangError, StorageError
from cogdist.executor.cluster import Cluster
from cogdist.executor.gang import GangState, ReplicaGang, RestartPolicy
from cogdist.metrics import RenderMetrics
from cogdist.progress import Progress
from cogdist.scheduler import Failed, Finished, Scheduler
from cogdist.scheduler.pending import PendingSet
from cogdist.sink import SINKS

COMMIT_ROWS = 1000  # commit early when this many rows are waiting
# A replica is handed a further unit while it renders only when what it holds should be done
# within this long: prefetching hides the driver's round trip for quick units, but a unit queued
# behind a slow one would wait there while another replica sits idle.
PREFETCH_SECONDS = 2.0
PLACEMENT_WARN_SECONDS = 60.0
WAIT_SECONDS = 0.5


@dataclass
class Replica:
    """One gang and what the loop knows of it."""

    index: int
    gang: ReplicaGang
    restarts: int = 0
    setup_pending: set[ray.ObjectRef] = field(default_factory=set)
    """The setup calls of its members not yet returned: it is ready when none is left."""
    last_error: str | None = None
    warned_placement: bool = False

    @property
    def ready(self) -> bool:
        return self.gang.state == GangState.READY


class Waiting(NamedTuple):
    """A call in flight: whose it is, and which unit it renders (None: a member's setup)."""

    replica: Replica
    unit_id: int | None


class RenderLoop:
    """The driver's loop of one render: keeps every replica `max_in_flight` units deep, hands what
    comes back to the job's Sink (committed in batches), retries failed rows through the Scheduler
    and rebuilds a replica whose workers die. It does not know which Sink it drives."""

    def __init__(
        self,
        job: Plan,
        cluster: Cluster,
        scheduler: Scheduler,
        counts: PendingSet,
        worker_class: type,
    ):
        self.job = job
        self.options = job.options
        self.scheduler = scheduler
        self.policy = RestartPolicy(self.options.max_gang_restarts)
        n, gang_spec = replica_layout(self.options, cluster)
        threads = None if gang_spec.gpus_per_member else int(gang_spec.cpus_per_member)
        args = (job.spec, job.out.worker_uri, worker_settings(self.options, threads))
        self.replicas = [Replica(i, ReplicaGang(i, gang_spec, worker_class, args)) for i in range(n)]
        self.waiting: dict[ray.ObjectRef, Waiting] = {}
        """Every call in flight: a unit's render, or a member's setup."""
        self.sink = SINKS[self.options.dataset](
            job.out,
            self.options.dataset,
            job.source.schema,
            job.spec.name,
            self.options.format,
            self.options.shard_size,
        )
        self.progress = Progress(counts.pending, self.options.progress, n)
        self.total = counts.pending
        self.metrics = RenderMetrics(job.out.public_uri, job.spec.name)
        self.metrics.rows([], 0, counts.pending)
        self.done = 0
        self.failed = 0
        self.first_ready: float = 0.0
        """perf_counter() when the first replica became ready (0: none yet)."""
        self.last_commit: float = 0.0
        """perf_counter() after the last commit."""
        self.commit_failed: bool = False
        """The store refused the index for --storage-timeout: the final commit is not tried again."""
        if self.options.progress:
            self.progress.write(
                f"cogdist: {n} replica(s) of {gang_spec.describe()} on a cluster with "
                f"{cluster.cpus:g} CPU / {cluster.gpus:g} GPU (Ray {'started' if cluster.owned else 'joined'} "
                f"in {cluster.start_seconds:.1f}s)"
            )

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            for replica in self.replicas:
                self._start(replica)
            self.last_commit = time.perf_counter()
            while not self.scheduler.finished:
                self._dispatch()
                if not self.waiting:
                    raise GangError(self._all_replicas_lost())
                ready, _ = ray.wait(list(self.waiting), num_returns=1, timeout=WAIT_SECONDS)
                if ready:
                    ready, _ = ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=0)
                for ref in ready:
                    if ref in self.waiting:  # a replica loss may have dropped it meanwhile
                        self._handle(ref)
                self._watch_placement()
                self._show_replicas()
                pending = self.sink.pending
                if pending and (
                    pending >= COMMIT_ROWS
                    or time.perf_counter() - self.last_commit >= self.options.commit_interval
                ):
                    self._commit()
        finally:
            try:
                if not self.commit_failed:  # it failed for --storage-timeout: do not wait again
                    self._commit(flush=True)
            finally:
                for replica in self.replicas:
                    replica.gang.kill()
                self.progress.close()

    def _dispatch(self) -> None:
        """Top every ready replica up to max_in_flight units, prefetching only behind quick ones."""
        for replica in self.replicas:
            if not replica.ready:
                continue
            held = [unit for r, unit in self.waiting.values() if r is replica and unit is not None]
            while len(held) < self.options.max_in_flight:
                if held:
                    expected = [self.scheduler.expected_seconds(u) for u in held]
                    if None in expected or sum(expected) > PREFETCH_SECONDS:  # type: ignore[arg-type]
                        break
                unit = self.scheduler.next_unit()
                if unit is None:
                    return
                self.waiting[replica.gang.submit(unit)] = Waiting(replica, unit.unit_id)
                held.append(unit.unit_id)

    def _handle(self, ref: ray.ObjectRef) -> None:
        replica, unit_id = self.waiting.pop(ref)
        try:
            result = ray.get(ref)
        except GangBroken as e:  # raised as a RayTaskError that is also a GangBroken
            self.waiting[ref] = Waiting(replica, unit_id)
            self._lose(replica, _describe(e))
            return
        except StorageError as e:  # a worker could not store an output for --storage-timeout
            raise StorageError(
                f"stopped: OUT cannot be written ({_describe(e)}). Rows finished so far are in the "
                "index; run the same command again to resume once the store is reachable."
            ) from None
        except ray.exceptions.RayTaskError as e:
            if unit_id is None:
                self._lose(replica, f"could not start: {_describe(e)}")
            else:
                self._record([], self.scheduler.unit_failed(unit_id, _describe(e)))
            return
        except ray.exceptions.RayError as e:  # the actor died or became unreachable
            self.waiting[ref] = Waiting(replica, unit_id)  # _lose collects every ref of the replica
            self._lose(replica, _describe(e))
            return
        if unit_id is None:
            replica.setup_pending.discard(ref)
            if not replica.setup_pending:
                replica.gang.state = GangState.READY
                self.first_ready = self.first_ready or time.perf_counter()
                self._show_replicas()
                if self.options.progress and replica.restarts:
                    self.progress.write(f"cogdist: replica {replica.index} is back ({result.device})")
            return
        self.metrics.steps(result.step_seconds)
        self._record(*self.scheduler.complete(unit_id, result.items, result.seconds), replica=replica.index)

    def _start(self, replica: Replica) -> None:
        refs = replica.gang.start()
        replica.setup_pending = set(refs)
        replica.warned_placement = False
        for ref in refs:
            self.waiting[ref] = Waiting(replica, None)

    def _lose(self, replica: Replica, reason: str) -> None:
        """A member died or failed to start: kill the gang, re-queue its units, maybe rebuild it."""
        lost = [ref for ref, (r, _) in self.waiting.items() if r is replica]
        failed: list[Failed] = []
        for ref in lost:
            _, unit_id = self.waiting.pop(ref)
            if unit_id is not None:
                failed += self.scheduler.unit_lost(unit_id, reason)
        replica.gang.kill()
        replica.last_error = reason
        self._show_replicas()
        self._record([], failed)
        if self.policy.should_restart(replica.restarts):
            replica.restarts += 1
            self.progress.write(
                f"cogdist: replica {replica.index} lost ({reason}); "
                f"rebuilding it ({replica.restarts}/{self.policy.max_restarts})"
            )
            self._start(replica)
        else:
            self.progress.write(
                f"cogdist: replica {replica.index} given up after {replica.restarts} rebuilds: {reason}"
            )

    def _show_replicas(self) -> None:
        holding = {id(r) for r, unit in self.waiting.values() if unit is not None}
        states = []
        for replica in self.replicas:
            if replica.ready:
                states.append("busy" if id(replica) in holding else "idle")
            elif replica.gang.state == GangState.DEAD:
                states.append("lost")
            else:
                states.append("restarting" if replica.restarts else "starting")
        self.progress.set_replicas(states)
        self.metrics.replicas_ready.set(states.count("busy") + states.count("idle"))

    def _all_replicas_lost(self) -> str:
        reasons = "\n".join(f"  replica {r.index}: {r.last_error}" for r in self.replicas)
        return (
            "every replica failed and was given up; the rows not rendered stay pending and a re-run "
            f"resumes them.\n{reasons}"
        )

    def _watch_placement(self) -> None:
        for replica in self.replicas:
            if (
                replica.gang.state == GangState.STARTING
                and not replica.warned_placement
                and time.monotonic() - replica.gang.started_at > PLACEMENT_WARN_SECONDS
                and not replica.gang.placement_ready()
            ):
                replica.warned_placement = True
                self.progress.write(
                    f"cogdist: replica {replica.index} has waited {PLACEMENT_WARN_SECONDS:.0f}s for "
                    f"{replica.gang.spec.describe()}; run `ray status` to see what the cluster has free"
                )

    # -- results ---------------------------------------------------------------------------

    def _record(self, finished: list[Finished], failed: list[Failed], replica: int | None = None) -> None:
        self.sink.add(finished, failed, replica)
        self.done += len(finished)
        self.failed += len(failed)
        for f in failed:
            self.progress.write(f"cogdist: row {f.row.item.id!r} failed: {f.error.splitlines()[0][:300]}")
        if finished or failed:
            self.progress.advance(done=len(finished), failed=len(failed))
            self.metrics.rows(
                [f.result.render_seconds for f in finished], len(failed), self.total - self.done - self.failed
            )
        if self.sink.wants_commit:
            self._commit(flush=True)

    def _commit(self, flush: bool = False) -> None:
        """Commit finished rows (after storing what the sink holds in memory, with `flush`) and failures."""
        try:
            self.sink.commit(flush)
        except StorageError as e:
            self.commit_failed = True
            raise StorageError(
                f"stopped: the index cannot be written ({e}). Rows rendered since the last commit will "
                "be rendered again; run the same command again to resume once the store is reachable."
            ) from None
        self.last_commit = time.perf_counter()


def _describe(error: BaseException) -> str:
    """One readable line (plus detail) for an error raised in a worker."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"[:2000]
    text = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {text[-1] if text else ''}")[:2000]
