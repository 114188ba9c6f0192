"""The render engine, run in the driver: manifest -> scheduler -> gangs -> index.

Everything that can be checked is checked before Ray starts (model, options, the whole
manifest, the job record in OUT), so a refused run writes nothing. Then the loop keeps every
replica `max_in_flight` units deep, commits finished rows to the index in batches, retries
failed rows, and rebuilds a replica whose workers die.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa

from cogdist.errors import EXIT_OK, EXIT_ROWS_FAILED, GangBroken, GangError, StorageError
from cogdist.executor.cluster import Cluster, connect, disconnect
from cogdist.executor.gang import GangSpec, GangState, ReplicaGang, RestartPolicy
from cogdist.manifest import ManifestSource, validate_manifest
from cogdist.manifest.rows import RowDefaults
from cogdist.metrics import RenderMetrics
from cogdist.models.layout import check_layout
from cogdist.models.registry import ModelSpec, resolve_model, with_defaults
from cogdist.options import RenderOptions
from cogdist.progress import Progress
from cogdist.scheduler import Failed, Finished, Scheduler
from cogdist.scheduler.pending import PendingSet, pending_rows, scan_pending
from cogdist.sink.dataset import FILES, ShardWriter, prepare_shards
from cogdist.sink.encode import extension
from cogdist.sink.job import JobSettings, check_resume, clear_outputs, write_job_record
from cogdist.sink.ledger import FAILURE_SCHEMA, FAILURES, INDEX, PartWriter, index_schema, now_utc, read_ids
from cogdist.storage import Location, open_location
from cogdist.worker.cache import NO_CACHE
from cogdist.worker.worker import RenderWorker, WorkerSettings

COMMIT_ROWS = 1000  # commit early when this many rows are waiting
# A replica is handed a further unit while it renders only when what it holds should be done
# within this long: prefetching hides the driver's round trip for quick units, but a unit queued
# behind a slow one would wait there while another replica sits idle.
PREFETCH_SECONDS = 2.0
PLACEMENT_WARN_SECONDS = 60.0
WAIT_SECONDS = 0.5


@dataclass(frozen=True)
class RenderSummary:
    """What a render did. `ok` is true when every manifest row is in the index."""

    out: str
    model: str
    total: int
    """Rows in the manifest."""
    done: int
    """Rows rendered and indexed by this run."""
    skipped: int
    """Rows already in the index when this run started."""
    failed: int
    """Rows this run recorded under failures/."""
    previously_failed: int
    """Rows an earlier run recorded as failed, skipped now (see retry_failed)."""
    seconds: float
    """Wall time of the whole call."""
    ray_start_seconds: float = 0.0
    """Starting (or joining) Ray."""
    startup_seconds: float = 0.0
    """From the call until the first replica was ready to render (checks, scan, Ray, model load)."""
    steady_seconds: float = 0.0
    """From the first replica ready until the last row was committed (shutdown excluded)."""

    @property
    def ok(self) -> bool:
        return self.skipped + self.done == self.total

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_ROWS_FAILED

    def describe(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        text = (
            f"{self.done} rendered, {self.skipped} already done, {self.failed} failed"
            f"{f', {self.previously_failed} failed earlier (not retried)' if self.previously_failed else ''}"
            f" of {self.total} rows in {self.seconds:.1f}s ({rate:.2f} items/s) -> {self.out}"
        )
        if self.failed or self.previously_failed:
            text += (
                f"\n{self.failed + self.previously_failed} row(s) are recorded in {self.out}/{FAILURES}; "
                "`cogdist status` lists them, --retry-failed renders them again"
            )
        return text


@dataclass(frozen=True)
class Plan:
    """A render that passed every up-front check."""

    options: RenderOptions
    spec: ModelSpec
    source: ManifestSource
    out: Location
    settings: JobSettings


def plan(options: RenderOptions) -> Plan:
    """Resolve the model and check options and manifest; writes nothing."""
    spec = with_defaults(
        resolve_model(
            options.model, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code
        ),
        width=options.width,
        height=options.height,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        num_frames=options.frames,
        fps=options.fps,
    )
    options.check(spec)
    options = options.resolved(spec)
    source = ManifestSource(options.manifest)
    validate_manifest(source, spec)
    out = open_location(options.out, options.storage_timeout)
    settings = JobSettings(
        model=spec.name,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        format=options.format,
        quality=options.quality,
        dtype=options.dtype,
        columns=tuple(source.schema.names),
        num_frames=spec.num_frames,
        fps=spec.fps,
        vae_tiling=bool(options.vae_tiling),
        save_frames=options.save_frames,
        dataset=None if options.dataset == FILES else options.dataset,
        cache=None if options.cache == NO_CACHE else options.cache,
        cache_threshold=options.cache_threshold,
    )
    return Plan(options, spec, source, out, settings)


def run(options: RenderOptions, *, worker_class: type = RenderWorker) -> RenderSummary:
    """Render every pending row of the manifest; see `cogdist.render` for the user-facing API."""
    started = time.perf_counter()
    job = plan(options)
    out = job.out
    if options.overwrite:
        clear_outputs(out)
    if not check_resume(out, job.settings):
        write_job_record(out, job.settings)
    for folder in (INDEX, FAILURES):
        out.sweep_temporary(folder)

    done_ids = read_ids(out, INDEX)
    failed_ids = pa.array([], pa.string()) if options.retry_failed else read_ids(out, FAILURES)
    counts = scan_pending(job.source, done_ids, failed_ids)
    log_line = (
        f"cogdist: {counts.total} rows in manifest, {counts.done} already done"
        + (f", {counts.failed} failed earlier (skipped)" if counts.failed else "")
        + f", {counts.pending} to render with {job.spec.name} -> {out.public_uri}"
    )
    if options.progress:
        print(log_line, file=sys.stderr, flush=True)

    def summary(loop: RenderLoop | None = None, ray_seconds: float = 0.0) -> RenderSummary:
        return RenderSummary(
            out=out.public_uri,
            model=job.spec.name,
            total=counts.total,
            done=loop.done if loop else 0,
            skipped=counts.done,
            failed=loop.failed if loop else 0,
            previously_failed=counts.failed,
            seconds=time.perf_counter() - started,
            ray_start_seconds=ray_seconds,
            startup_seconds=loop.first_ready - started if loop and loop.first_ready else 0.0,
            steady_seconds=loop.last_commit - loop.first_ready if loop and loop.first_ready else 0.0,
        )

    if counts.pending == 0:
        return summary()

    defaults = RowDefaults(extension=extension(job.options.format), save_frames=job.options.save_frames)
    rows = pending_rows(job.source, counts, job.spec, defaults)
    scheduler = Scheduler(rows, batch_size=options.batch_size, max_retries=options.max_retries)
    embedded_cpus = max(os.cpu_count() or 1, (options.replicas or 2) * options.gang_size)
    cluster = connect(options.address, num_cpus=embedded_cpus)
    try:
        if cluster.gpus >= 1:  # a gang's GPUs must share a node
            check_layout(job.spec, options.sp, options.cfg_parallel, cluster.max_node_gpus)
        loop = RenderLoop(job, cluster, scheduler, counts, worker_class)
        loop.run()
    finally:
        disconnect(cluster)
    return summary(loop, cluster.start_seconds)


def replica_layout(options: RenderOptions, cluster: Cluster) -> tuple[int, GangSpec]:
    """How many gangs, and what each member reserves, on this cluster."""
    size = options.gang_size
    if cluster.gpus >= 1:
        replicas = options.replicas or max(1, int(cluster.gpus // size))
        return replicas, GangSpec(size, options.cpus_per_worker or 1.0, 1.0)
    replicas = options.replicas or 2
    share = max(1, int(cluster.max_node_cpus // (replicas * size)))
    return replicas, GangSpec(size, options.cpus_per_worker or float(share), 0.0)


def worker_settings(options: RenderOptions, threads: int | None = None) -> WorkerSettings:
    """What every worker of a job is given, from the job's resolved options; `threads`: torch's
    intra-op threads on a CPU worker (None: torch's default)."""
    return WorkerSettings(
        format=options.format,
        quality=options.quality,
        dtype=options.dtype,
        threads=threads,
        vae_tiling=bool(options.vae_tiling),
        vae_slicing=bool(options.vae_slicing),
        cpu_offload=bool(options.cpu_offload),
        sp=options.sp,
        cfg_parallel=options.cfg_parallel,
        collective_timeout=options.collective_timeout,
        storage_timeout=options.storage_timeout,
        step_checkpoint=options.step_checkpoint,
        cache=options.cache,
        cache_threshold=options.cache_threshold,
        return_outputs=options.dataset != FILES,
    )


@dataclass
class Replica:
    index: int
    gang: ReplicaGang
    restarts: int = 0
    setup_pending: set = field(default_factory=set)
    last_error: str | None = None
    warned_placement: bool = False

    @property
    def ready(self) -> bool:
        return self.gang.state == GangState.READY


class RenderLoop:
    def __init__(
        self,
        job: Plan,
        cluster: Cluster,
        scheduler: Scheduler,
        counts: PendingSet,
        worker_class: type,
    ):
        import ray

        self.ray = ray
        self.job = job
        self.options = job.options
        self.scheduler = scheduler
        self.policy = RestartPolicy(self.options.max_gang_restarts)
        n, gang_spec = replica_layout(self.options, cluster)
        threads = None if gang_spec.gpus_per_member else int(gang_spec.cpus_per_member)
        args = (job.spec, job.out.worker_uri, worker_settings(self.options, threads))
        self.replicas = [Replica(i, ReplicaGang(i, gang_spec, worker_class, args)) for i in range(n)]
        self.waiting: dict = {}  # ObjectRef -> (Replica, unit id or None for a setup call)
        self.index = PartWriter(job.out, INDEX, index_schema(job.source.schema))
        self.shards: ShardWriter | None = None
        if self.options.dataset != FILES:
            first = prepare_shards(job.out, self.options.dataset)
            self.shards = ShardWriter(
                job.out, self.options.dataset, self.options.shard_size, first, self.index.schema
            )
        self.failures = PartWriter(job.out, FAILURES, FAILURE_SCHEMA)
        self.progress = Progress(counts.pending, self.options.progress, n)
        self.total = counts.pending
        self.metrics = RenderMetrics(job.out.public_uri, job.spec.name)
        self.metrics.rows([], 0, counts.pending)
        self.done = 0
        self.failed = 0
        self.first_ready = 0.0  # perf_counter() when the first replica became ready
        self.last_commit = 0.0  # perf_counter() after the last commit
        self.commit_failed = False  # the store refused the index for --storage-timeout
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
                ready, _ = self.ray.wait(list(self.waiting), num_returns=1, timeout=WAIT_SECONDS)
                if ready:
                    ready, _ = self.ray.wait(list(self.waiting), num_returns=len(self.waiting), timeout=0)
                for ref in ready:
                    if ref in self.waiting:  # a replica loss may have dropped it meanwhile
                        self._handle(ref)
                self._watch_placement()
                self._show_replicas()
                pending = self.index.pending + self.failures.pending
                if pending and (
                    pending >= COMMIT_ROWS
                    or time.perf_counter() - self.last_commit >= self.options.commit_interval
                ):
                    self._commit()
        finally:
            try:
                if not self.commit_failed:  # it failed for --storage-timeout: do not wait again
                    self._commit(flush_shards=True)
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
                self.waiting[replica.gang.submit(unit)] = (replica, unit.unit_id)
                held.append(unit.unit_id)

    def _handle(self, ref) -> None:
        replica, unit_id = self.waiting.pop(ref)
        exceptions = self.ray.exceptions
        try:
            result = self.ray.get(ref)
        except GangBroken as e:  # raised as a RayTaskError that is also a GangBroken
            self.waiting[ref] = (replica, unit_id)
            self._lose(replica, _describe(e))
            return
        except StorageError as e:  # a worker could not store an output for --storage-timeout
            raise StorageError(
                f"stopped: OUT cannot be written ({_describe(e)}). Rows finished so far are in the "
                "index; run the same command again to resume once the store is reachable."
            ) from None
        except exceptions.RayTaskError as e:
            if unit_id is None:
                self._lose(replica, f"could not start: {_describe(e)}")
            else:
                self._record([], self.scheduler.unit_failed(unit_id, _describe(e)))
            return
        except exceptions.RayError as e:  # the actor died or became unreachable
            self.waiting[ref] = (replica, unit_id)  # _lose collects every ref of the replica
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
            self.waiting[ref] = (replica, None)

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
        if finished:
            rows = [self._index_row(f, replica) for f in finished]
            if self.shards is None:
                self.index.add(rows)
            else:  # the rows enter the index once their shard is written
                for row, f in zip(rows, finished):
                    self.shards.add(row, f.result.data or b"", extension(self.options.format))
            self.done += len(finished)
        if failed:
            self.failures.add(
                [
                    {
                        "id": f.row.item.id,
                        "error": f.error,
                        "attempts": f.row.attempts + f.row.crashes,
                        "model": self.job.spec.name,
                        "failed_at": now_utc(),
                    }
                    for f in failed
                ]
            )
            self.failed += len(failed)
            for f in failed:
                self.progress.write(f"cogdist: row {f.row.item.id!r} failed: {f.error.splitlines()[0][:300]}")
        if finished or failed:
            self.progress.advance(done=len(finished), failed=len(failed))
            self.metrics.rows(
                [f.result.render_seconds for f in finished], len(failed), self.total - self.done - self.failed
            )
        if self.shards is not None and self.shards.full:
            self._commit(flush_shards=True)

    def _index_row(self, finished: Finished, replica: int | None) -> dict:
        item = finished.row.item
        frames = finished.result.frames or item.num_frames
        row = dict(finished.row.manifest_row)
        row.update(
            id=item.id,
            uri=self.job.out.uri_of(item.output),
            path=item.output,
            seed=item.seed,
            width=item.width,
            height=item.height,
            num_frames=frames,
            fps=item.fps,
            duration=frames / item.fps if frames and item.fps else None,
            task=item.task,
            frames_path=item.frames_dir,
            num_inference_steps=item.num_inference_steps,
            guidance_scale=item.guidance_scale,
            model=self.job.spec.name,
            format=self.options.format,
            bytes=finished.result.bytes_written,
            sha256=finished.result.sha256,
            render_seconds=finished.result.render_seconds,
            replica=replica,
            finished_at=now_utc(),
            attempts=finished.row.attempts + 1,
        )
        return row

    def _commit(self, flush_shards: bool = False) -> None:
        """Commit finished rows (after writing their shard, in a dataset mode) and failures."""
        try:
            if flush_shards and self.shards is not None:
                self.index.add(self.shards.flush())
            self.index.commit()
            self.failures.commit()
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
