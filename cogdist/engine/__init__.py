"""The render engine, run in the driver: manifest -> scheduler -> gangs -> sink.

`plan` checks everything that can be checked before Ray starts (model, options, the whole
manifest, the job record in OUT), so a refused run writes nothing (cogdist.engine.plan). Then
`RenderLoop` keeps every replica busy and hands finished rows to the job's Sink
(cogdist.engine.loop, cogdist.sink).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from cogdist.engine.loop import RenderLoop
from cogdist.engine.plan import Plan, ReplicaLayout, plan, replica_layout, worker_settings
from cogdist.errors import EXIT_OK, EXIT_ROWS_FAILED
from cogdist.executor.cluster import connect, disconnect
from cogdist.failures import FailurePolicy
from cogdist.options import RenderOptions
from cogdist.scheduler import Scheduler
from cogdist.scheduler.pending import pending_rows, scan_pending
from cogdist.sink.job import check_resume, clear_outputs, write_job_record
from cogdist.sink.journal import JOURNAL, recover
from cogdist.sink.ledger import FAILURES, INDEX, read_ids
from cogdist.worker.worker import RenderWorker

__all__ = [
    "Plan",
    "RenderLoop",
    "RenderSummary",
    "ReplicaLayout",
    "plan",
    "replica_layout",
    "run",
    "worker_settings",
]


@dataclass(frozen=True)
class RenderSummary:
    """What a render did. `ok` is true when every manifest row is in the index."""

    out: str
    model: str
    total: int
    """Rows to render in all: the manifest's rows times --samples."""
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
    compile_seconds: float = 0.0
    """--compile: the rendered rows' compile time, summed over workers (not in their render_seconds)."""

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
        if self.compile_seconds:
            text += f"\ncompiling took {self.compile_seconds:.1f}s, summed over the workers (--compile)"
        if self.failed or self.previously_failed:
            text += (
                f"\n{self.failed + self.previously_failed} row(s) are recorded in {self.out}/{FAILURES}; "
                "`cogdist status` lists them, --retry-failed renders them again"
            )
        return text


def run(options: RenderOptions, *, worker_class: type = RenderWorker) -> RenderSummary:
    """Render every pending row of the manifest; see `cogdist.render` for the user-facing API."""
    started = time.perf_counter()
    job = plan(options)
    out = job.out
    if options.overwrite:
        clear_outputs(out)
    if not check_resume(out, job.settings):
        write_job_record(out, job.settings)
    for folder in (INDEX, FAILURES, JOURNAL):
        out.sweep_temporary(folder)

    done_ids = read_ids(out, INDEX)
    recovered = recover(out, done_ids)  # rows a killed driver made durable but did not index
    if len(recovered):
        done_ids = pa.concat_arrays([done_ids, recovered])
    failed_ids = pa.array([], pa.string()) if options.retry_failed else read_ids(out, FAILURES)
    counts = scan_pending(job.source, done_ids, failed_ids, options.samples)
    log_line = (
        f"cogdist: {counts.total} rows in manifest"
        + (f" ({options.samples} samples of each)" if options.samples > 1 else "")
        + f", {counts.done} already done"
        + (f" ({len(recovered)} indexed from the journal of a killed run)" if len(recovered) else "")
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
            steady_seconds=loop.commits.last - loop.first_ready if loop and loop.first_ready else 0.0,
            compile_seconds=loop.compile_seconds if loop else 0.0,
        )

    if counts.pending == 0:
        return summary()

    defaults = job.row_defaults
    rows = pending_rows(job.source, counts, job.spec, defaults)
    policy = FailurePolicy(max_retries=options.max_retries, max_gang_restarts=options.max_gang_restarts)
    scheduler = Scheduler(rows, batch_size=options.batch_size, policy=policy)
    embedded_cpus = max(os.cpu_count() or 1, (options.replicas or 2) * options.gang_size)
    cluster = connect(options.address, num_cpus=embedded_cpus)
    try:
        loop = RenderLoop(job, cluster, scheduler, counts, worker_class)
        loop.run()
    finally:
        disconnect(cluster)
    return summary(loop, cluster.start_seconds)
