"""The replica loop, run in the driver: keeps every gang busy, follows the cluster as nodes come
and go, reports each failure to the job's FailurePolicy and acts on its decision, and hands
finished rows to the job's Sink."""

from __future__ import annotations

import contextlib
import math
import time

import ray

from cogdist.engine.commits import Commits
from cogdist.engine.fleet import (
    Replica,
    Waiting,
    all_replicas_lost,
    classify,
    describe_error,
    short_nodes,
    waiting_for,
)
from cogdist.engine.plan import Plan, ReplicaLayout, pin_attention_backend, replica_layout, worker_settings
from cogdist.errors import CapacityError, GangError
from cogdist.executor.cluster import Cluster, Node, alive_nodes
from cogdist.executor.gang import GangState, ReplicaGang
from cogdist.failures import Failure, FailureDecision, FailurePolicy, ReplicaAction, RowCharge
from cogdist.metrics import RenderMetrics
from cogdist.progress import Progress
from cogdist.scheduler import Finished, Scheduler
from cogdist.scheduler.pending import PendingSet
from cogdist.sink import SINKS
from cogdist.worker.attention import AUTO

COMMIT_ROWS = 1000  # commit early when this many rows are waiting
# A replica is handed a further unit while it renders only when what it holds should be done
# within this long: prefetching hides the driver's round trip for quick units, but a unit queued
# behind a slow one would wait there while another replica sits idle.
PREFETCH_SECONDS = 2.0
WAIT_SECONDS = 0.5
FLEET_SECONDS = 2.0
"""How often the loop looks at the cluster: nodes joined, drained or gone, gangs placed."""
WAITING_NOTICE_SECONDS = (8.0, 60.0)
"""A replica not placed after the first says what it waits for; again after each second."""
REQUEST_SECONDS = 30.0
"""The autoscaler hears of a changed request at most this often (a withdrawal at once)."""


class RenderLoop:
    """The driver's loop of one render: keeps every replica `max_in_flight` units deep, hands what
    comes back to the job's Sink (committed in batches), grows the replicas with the cluster, and
    reports every failure to the FailurePolicy, whose decision it carries out. It does not know
    which Sink it drives."""

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
        self.policy: FailurePolicy = scheduler.policy
        self.cluster = cluster
        self.layout: ReplicaLayout = replica_layout(self.options, job.spec, cluster)
        gang_spec = self.layout.gang
        threads = None if gang_spec.gpus_per_member else int(gang_spec.cpus_per_member)
        self.worker_args = (
            job.spec,
            job.out.worker_uri,
            worker_settings(self.options, threads),
            worker_class,
        )
        self.replicas: list[Replica] = []
        self.waiting: dict[ray.ObjectRef, Waiting] = {}
        """Every call in flight: a unit's render, or a member's setup."""
        self.known_nodes: dict[str, Node] = {n.id: n for n in cluster.nodes}
        self.requested: int | None = None
        """Gangs last asked of the autoscaler (None: never asked)."""
        self.last_request = 0.0
        self.last_fleet = 0.0
        self.unplaced_since: float | None = None
        """monotonic() since when no replica could be placed (None: one is placed or ready)."""
        self.next_notice = 0.0
        self.sink = SINKS[self.options.dataset](
            job.out,
            self.options.dataset,
            job.source.schema,
            job.spec.name,
            self.options.format,
            self.options.shard_size,
            self.options.commit_interval,
            self.options.index_interval,
        )
        n = self.layout.replicas
        if self.layout.follows_cluster:  # never more gangs than units to render
            n = min(n, self._units_left(counts.pending))
        self.progress = Progress(counts.pending, self.options.progress, n)
        self.total = counts.pending
        self.metrics = RenderMetrics(job.out.public_uri, job.spec.name)
        self.metrics.rows([], 0, counts.pending)
        self.done = 0
        self.failed = 0
        self.compile_seconds = 0.0  # --compile: the rows' compile time, summed over workers
        self.first_ready: float = 0.0
        """perf_counter() when the first replica became ready (0: none yet)."""
        self.commits = Commits(self.sink)
        for _ in range(n):
            self._add_replica()
        if self.options.progress:
            growth = ""
            if self.layout.follows_cluster:
                cap = f", up to {self.layout.max_replicas}" if self.layout.max_replicas else ""
                growth = f", growing with the cluster{cap}"
            self.progress.write(
                f"cogdist: {n} replica(s) of {gang_spec.describe()}{growth} on a cluster with "
                f"{cluster.cpus:g} CPU / {cluster.gpus:g} GPU (Ray {'started' if cluster.owned else 'joined'} "
                f"in {cluster.start_seconds:.1f}s)"
            )

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            for replica in self.replicas:
                self._start(replica)
            self.commits.last = time.perf_counter()
            while not self.scheduler.finished:
                self._dispatch()
                if not self.waiting:
                    self._watch_fleet()  # replicas left idle on a drained or vanished node move
                    if not self.waiting:
                        raise GangError(all_replicas_lost(self.replicas))
                ready, _ = ray.wait(list(self.waiting), num_returns=1, timeout=WAIT_SECONDS)
                if ready:
                    ready, _ = ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=0)
                for ref, result in self._fetch(ready):
                    if ref in self.waiting:  # a replica loss may have dropped it meanwhile
                        self._handle(ref, result)
                if time.monotonic() - self.last_fleet >= FLEET_SECONDS:
                    self._watch_fleet()
                self._show_replicas()
                self.commits.poll()
                pending = self.commits.pending
                if pending and (
                    pending >= COMMIT_ROWS
                    or time.perf_counter() - self.commits.last >= self.options.commit_interval
                ):
                    self.commits.start()
        finally:
            try:
                self.commits.finish()
            finally:
                for replica in self.replicas:  # removes every placement group the job made
                    replica.gang.kill()
                with contextlib.suppress(Exception):  # the cluster may be gone with the driver's error
                    self._request(0)
                self.commits.close()
                self.progress.close()

    def _dispatch(self) -> None:
        """Top every ready replica up to max_in_flight units. A further unit goes behind what it
        holds only when that should be done within PREFETCH_SECONDS, and never behind a unit that
        must render alone."""
        for replica in self.replicas:
            if not replica.ready or replica.draining:
                continue
            held = replica.units
            while len(held) < self.options.max_in_flight:
                if held and not self._prefetches_behind(replica):
                    break
                unit = self.scheduler.next_unit(behind=bool(held))
                if unit is None:
                    return
                if not held:
                    replica.head_since = time.perf_counter()
                self.waiting[replica.gang.submit(unit)] = Waiting(replica, unit.unit_id)
                held.append(unit.unit_id)

    def _prefetches_behind(self, replica: Replica) -> bool:
        """Whether what `replica` holds should be done within PREFETCH_SECONDS (behind a unit of
        unknown cost only where no other replica could take the next one): then its next unit's
        inputs are read and its render starts as soon as the last one's pixels are off the device."""
        if any(self.scheduler.alone(unit_id) for unit_id in replica.units):
            return False
        expected = [self.scheduler.expected_seconds(unit_id) for unit_id in replica.units]
        if None in expected:
            # The job's first units: their cost is known once one returns, after its uploads.
            return self._only_replica_ever(replica)
        remaining = sum(expected) - (time.perf_counter() - replica.head_since)  # type: ignore[arg-type]
        return remaining <= PREFETCH_SECONDS

    def _only_replica_ever(self, replica: Replica) -> bool:
        """`replica` is the one gang of a fixed fleet: a unit queued behind it waits for no one."""
        return not self.layout.follows_cluster and len(self.replicas) == 1 and self.replicas[0] is replica

    @staticmethod
    def _fetch(refs: list[ray.ObjectRef]) -> list[tuple[ray.ObjectRef, object]]:
        """Each ready call with its result, or the RayError it raised (RayTaskError: the worker
        raised; else its actor died): one ray.get for them all, one each when any of them failed."""
        try:
            return list(zip(refs, ray.get(refs)))
        except ray.exceptions.RayError:
            pass
        results: list[tuple[ray.ObjectRef, object]] = []
        for ref in refs:
            try:
                results.append((ref, ray.get(ref)))
            except ray.exceptions.RayError as e:
                results.append((ref, e))
        return results

    def _handle(self, ref: ray.ObjectRef, result) -> None:
        replica, unit_id = self.waiting[ref]
        if isinstance(result, ray.exceptions.RayError):
            used = replica.nodes or replica.gang.node_ids()
            failure = classify(result, unit_id is None, used, self.known_nodes)
            self._fail(failure, replica, ref, describe_error(result))
            return
        del self.waiting[ref]
        if unit_id is None:
            if not self._renders_with_the_jobs_attention(replica, result.attention_backend):
                return
            replica.setup_pending.discard(ref)
            if not replica.setup_pending:
                replica.gang.state = GangState.READY
                replica.nodes = replica.nodes or replica.gang.node_ids()
                self.unplaced_since = None
                self.first_ready = self.first_ready or time.perf_counter()
                self._show_replicas()
                if self.options.progress and replica.rebuilds:
                    self.progress.write(f"cogdist: replica {replica.index} is back ({result.device})")
            return
        replica.units.remove(unit_id)
        replica.head_since = time.perf_counter()
        self.policy.rendered(replica.index)
        self.metrics.steps(result.step_seconds)
        self._record(
            *self.scheduler.complete(unit_id, result.items, result.render_time), replica=replica.index
        )

    def _renders_with_the_jobs_attention(self, replica: Replica, chosen: str) -> bool:
        """--attention-backend auto: the first worker's choice is the job's; other choices restart."""
        spec, out_uri, settings, worker_class = self.worker_args
        if chosen != settings.attention_backend and settings.attention_backend != AUTO:
            again = f"the job renders with {settings.attention_backend}: starting it again with that"
            self.progress.write(
                f"cogdist: replica {replica.index} chose --attention-backend {chosen}, {again}"
            )
            self._tear_down(replica)
            self._start(replica)
            return False
        if settings.attention_backend == AUTO:
            settings = pin_attention_backend(self.job, settings, chosen)
            self.worker_args = (spec, out_uri, settings, worker_class)
            for other in self.replicas:
                other.gang.worker_args = (spec, out_uri, settings)
            self.progress.write(f"cogdist: --attention-backend auto: {chosen} (the first worker's choice)")
        return True

    def _fail(self, failure: Failure, replica: Replica, ref: ray.ObjectRef, reason: str) -> None:
        """Carry out the policy's decision on a failure of `replica` (the call `ref` failed)."""
        decision = self.policy.make_decision(failure, replica.index, reason)
        if decision.replica == ReplicaAction.KEEP:
            _, unit_id = self.waiting.pop(ref)
            if unit_id is not None:
                replica.units.remove(unit_id)
                self._record([], self.scheduler.requeue(unit_id, decision.rows, reason))
            if decision.stop is not None:
                raise decision.stop
            return
        # The gang goes: every call it has in flight is settled. A unit alone was the one being
        # rendered. Of several, the oldest may have been storing its outputs while the next
        # rendered: none is charged, and each renders again alone, where a death is its own.
        held = self._tear_down(replica)
        alone = len(held) > 1 and decision.rows != RowCharge.FREE
        failed = []
        for position, unit_id in enumerate(held):
            charge = decision.rows if position == 0 and not alone else RowCharge.FREE
            failed += self.scheduler.requeue(unit_id, charge, reason, alone=alone)
        replica.last_error = reason
        self._show_replicas()
        self._record([], failed)
        self._act_on_replica(replica, decision)

    def _act_on_replica(self, replica: Replica, decision: FailureDecision) -> None:
        if decision.stop is not None:
            raise decision.stop
        self.progress.write(f"cogdist: {decision.message}")
        if decision.replica == ReplicaAction.GIVE_UP:
            replica.given_up = True
            return
        replica.rebuilds += 1
        self._start(replica)

    def _tear_down(self, replica: Replica) -> list[int]:
        """Kill a replica's gang (its placement group goes too) and drop its calls in flight;
        returns the units it held, oldest first."""
        held, replica.units = replica.units, []
        for key in [key for key, (r, _) in self.waiting.items() if r is replica]:
            del self.waiting[key]
        replica.gang.kill()
        replica.nodes, replica.draining = set(), False
        return held

    def _add_replica(self) -> Replica:
        spec, out_uri, settings, worker_class = self.worker_args
        index = len(self.replicas)
        gang = ReplicaGang(
            index, self.layout.gang, worker_class, (spec, out_uri, settings), calls=self.options.max_in_flight
        )
        replica = Replica(index, gang)
        self.replicas.append(replica)
        return replica

    def _start(self, replica: Replica) -> None:
        refs = replica.gang.start()
        replica.setup_pending = set(refs)
        for ref in refs:
            self.waiting[ref] = Waiting(replica, None)

    # -- the cluster -----------------------------------------------------------------------

    def _watch_fleet(self) -> None:
        """Nodes drained, gone or joined: move, rebuild and add replicas; ask the autoscaler for
        what the job can use; wait (up to --capacity-timeout) while no gang can be placed."""
        self.last_fleet = time.monotonic()
        nodes = alive_nodes()
        self.known_nodes.update({n.id: n for n in nodes})
        draining = {n.id for n in nodes if n.draining}
        alive = {n.id for n in nodes}
        for replica in self.replicas:
            if replica.given_up or replica.gang.state == GangState.DEAD:
                continue
            if not replica.placed and replica.gang.placement_ready():
                replica.nodes = replica.gang.node_ids()
            holds = bool(replica.units)
            if replica.nodes and not replica.nodes <= alive and not holds:
                # Its node left while it held nothing: no call will fail to tell us.
                self._retire(replica, f"its node {short_nodes(replica.nodes - alive)} left the cluster")
            elif replica.nodes & draining and not replica.draining:
                replica.draining = True
                self.progress.write(
                    f"cogdist: replica {replica.index}: node {short_nodes(replica.nodes & draining)} is being "
                    "drained; it gets no new unit and moves once its units are done"
                )
            if replica.draining and not holds and replica.ready:
                self._retire(replica, f"node {short_nodes(replica.nodes)} drained")
        units_left = self._units_left(self.total - self.done - self.failed)
        if self.layout.follows_cluster:
            active = [r for r in self.replicas if not r.given_up]
            target = min(self.layout.capacity(nodes), units_left)
            for _ in range(target - len(active)):
                replica = self._add_replica()
                self._start(replica)
                self.progress.write(
                    f"cogdist: the cluster has room for another gang: replica {replica.index} starting"
                )
            wanted = units_left if self.scheduler.has_work() else 0
            self._request(min(wanted, self.layout.max_replicas or wanted))
        self._watch_capacity(nodes)

    def _retire(self, replica: Replica, reason: str) -> None:
        """Move a replica that holds no unit off its node (charged to nobody)."""
        self._tear_down(replica)
        self.progress.write(
            f"cogdist: replica {replica.index}: {reason}; rebuilding it where the cluster has room"
        )
        replica.rebuilds += 1
        self._start(replica)

    def _watch_capacity(self, nodes: list[Node]) -> None:
        """While no replica is placed or ready: say what the job waits for, and stop after
        --capacity-timeout."""
        active = [r for r in self.replicas if not r.given_up]
        if not active or any(r.ready or r.placed for r in active):
            self.unplaced_since = None
            return
        now = time.monotonic()
        if self.unplaced_since is None:
            self.unplaced_since, self.next_notice = now, now + WAITING_NOTICE_SECONDS[0]
        what = waiting_for(self.layout, nodes)
        waited = now - self.unplaced_since
        if waited > self.options.capacity_timeout:
            raise CapacityError(
                f"stopped after {waited:.0f}s (--capacity-timeout {self.options.capacity_timeout:g}) {what}. "
                "Rows finished so far are indexed; run the same command again once the cluster has room."
            )
        if now >= self.next_notice:
            self.next_notice = now + WAITING_NOTICE_SECONDS[1]
            self.progress.write(f"cogdist: {what} (waited {waited:.0f}s of --capacity-timeout)")

    def _request(self, gangs: int) -> None:
        """Ask the autoscaler for `gangs` whole gangs (0: withdraw); only on a cluster the job joined."""
        if (
            not self.layout.follows_cluster
            or gangs == self.requested
            or (self.requested is None and not gangs)
        ):
            return
        now = time.monotonic()
        if gangs and self.requested and now - self.last_request < REQUEST_SECONDS:
            return  # a shrinking count need not reach the autoscaler every few seconds; 0 does
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[self.replicas[0].gang.total_bundle()] * gangs if gangs else [])
        self.requested, self.last_request = gangs, now

    def _units_left(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.options.batch_size))

    # -- what the user sees ----------------------------------------------------------------

    def _show_replicas(self) -> None:
        states = []
        for replica in self.replicas:
            if replica.given_up:
                states.append("lost")
            elif replica.ready:
                states.append("draining" if replica.draining else "busy" if replica.units else "idle")
            elif not replica.placed and time.monotonic() - replica.gang.started_at > FLEET_SECONDS:
                states.append("waiting")
            else:
                states.append("restarting" if replica.rebuilds else "starting")
        nodes = set().union(*(r.nodes for r in self.replicas if r.ready))
        self.progress.set_replicas(states, nodes=len(nodes))
        self.metrics.replicas_ready.set(states.count("busy") + states.count("idle"))

    # -- results ---------------------------------------------------------------------------

    def _record(self, finished: list[Finished], failed: list, replica: int | None = None) -> None:
        self.commits.add(finished, failed, replica)
        self.done += len(finished)
        self.failed += len(failed)
        for f in failed:
            self.progress.write(f"cogdist: row {f.row.item.id!r} failed: {f.error.splitlines()[0][:300]}")
        if finished or failed:
            compiled = sum(f.result.compile_seconds for f in finished)
            self.compile_seconds += compiled
            self.progress.advance(done=len(finished), failed=len(failed), compile_seconds=compiled)
            self.metrics.rows(
                [f.result.render_seconds for f in finished], len(failed), self.total - self.done - self.failed
            )
