"""A job's rows rendered in this process, without Ray: the reference a batched, distributed or
resumed run is compared with.

`render_in_process` plans the job as `cogdist render` does (model, defaults, manifest checks),
then runs `RenderWorker` exactly as one actor of a single-GPU replica does: `setup`, then `render`
of one unit per row, writing the outputs under OUT. It costs a pipeline build, not a Ray instance
and worker processes, so a test can afford one wherever the reference is not what it tests.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from cogdist.engine import plan, worker_settings
from cogdist.options import RenderOptions
from cogdist.scheduler.pending import pending_rows, scan_pending
from cogdist.work import WorkUnit
from cogdist.worker.worker import RenderWorker
from tests.conftest import probe_mp4, write_manifest


def render_in_process(
    rows: list[dict], model: str, out: Path, threads: int | None = None, **options: object
) -> dict[str, np.ndarray]:
    """Render `rows` with `model` into the folder `out`, one row per unit, on one in-process
    worker; returns each row's decoded output (an image, or a video's frames), by id. `threads`:
    torch's CPU threads meanwhile, as a worker given that many CPUs sets them (restored after)."""
    worker, job, pending = in_process_worker(rows, model, out, threads, **options)
    before = torch.get_num_threads()
    try:
        worker.setup()
        return _render_rows(worker, job, pending, out)
    finally:
        torch.set_num_threads(before)


def in_process_worker(rows: list[dict], model: str, out: Path, threads: int | None = None, **options: object):
    """(worker, job, pending rows) of `rows` planned as `cogdist render` plans them; the worker
    is not set up yet."""
    manifest = write_manifest(out.with_name(out.name + "-manifest.parquet"), rows)
    job = plan(RenderOptions(str(manifest), model, str(out), **options))  # type: ignore[arg-type]
    empty = pa.array([], pa.string())
    defaults = job.row_defaults
    pending_set = scan_pending(job.source, empty, empty, job.options.samples)
    pending = pending_rows(job.source, pending_set, job.spec, defaults)
    worker = RenderWorker(job.spec, job.out.worker_uri, worker_settings(job.options, threads))
    return worker, job, list(pending)


def _render_rows(worker: RenderWorker, job, pending, out: Path) -> dict[str, np.ndarray]:
    decoded = {}
    for number, (item, _) in enumerate(pending):
        [result] = worker.render(WorkUnit(number, (item,))).items
        assert result.ok, result.error
        decoded[item.id] = decode_output(job, item, out)
    return decoded


def decode_output(job, item, out: Path) -> np.ndarray:
    """A row's stored output, decoded: an image, or a video's frames."""
    data = job.out.read_bytes(item.output)
    if not item.output.endswith(".mp4"):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    path = out / ".decoding.mp4"
    path.write_bytes(data)
    try:
        return probe_mp4(path)[1]
    finally:
        path.unlink()
