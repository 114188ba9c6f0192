"""The Python API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.engine import RenderSummary, plan
from cogdist.engine import run as _run
from cogdist.errors import UsageError
from cogdist.manifest import ManifestSource, ValidationReport
from cogdist.models.registry import PRESETS, ModelSpec
from cogdist.options import RenderOptions
from cogdist.scheduler.pending import scan_pending
from cogdist.sink.job import JOB_RECORD
from cogdist.sink.journal import done_ids
from cogdist.sink.ledger import FAILURES, read_table
from cogdist.storage import open_location

if TYPE_CHECKING:
    from cogdist.reporting import ReportFiles

_OPTION_NAMES = {f.name for f in fields(RenderOptions)} - {"manifest", "model", "out"}


def render(manifest: str, *, model: str, out: str, **options: object) -> RenderSummary:
    """Render every row of `manifest` with `model` into `out`; resumes what `out` already holds.

    `options` are the fields of `RenderOptions` (replicas, batch_size, max_retries, format,
    steps, guidance, address, overwrite, retry_failed, ...). Raises a CogdistError subclass for
    anything refused before rendering; rows that fail are recorded, not raised: check
    `summary.ok`.
    """
    if "cpu_offload" in options:  # earlier versions' name of offload="model"
        options["offload"] = "model" if options.pop("cpu_offload") else "none"
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_OPTION_NAMES))}"
        )
    return _run(RenderOptions(manifest=manifest, model=model, out=out, **options))  # type: ignore[arg-type]


def validate(manifest: str, *, model: str, **options: object) -> ValidationReport:
    """Run the manifest checks of a render (and its option checks) without rendering anything."""
    job = plan(RenderOptions(manifest=manifest, model=model, out=".", **options))  # type: ignore[arg-type]
    return ValidationReport(rows=job.source.num_rows, files=len(job.source.files))


def models() -> list[ModelSpec]:
    """The model presets (tiny random-weight ones included)."""
    return list(PRESETS.values())


def save_model(preset: str, folder: str) -> str:
    """Write the tiny preset `preset` as a diffusers folder (`save_pretrained`, safetensors) and
    return its path: it loads with `--model FOLDER` and with stock diffusers' `from_pretrained`."""
    import os

    import torch

    from cogdist.models.registry import family

    spec = PRESETS.get(preset)
    if spec is None or not spec.tiny:
        tiny = ", ".join(name for name, s in PRESETS.items() if s.tiny)
        why = f"{preset} is a Hub checkpoint (already a folder there)" if spec else f"no preset {preset!r}"
        raise UsageError(f"cogdist models --save: {why}; the presets built in memory are {tiny}")
    folder = os.path.abspath(folder)
    if os.path.isdir(folder) and os.listdir(folder):
        raise UsageError(f"cogdist models --save: {folder} is not empty")
    pipe = family(spec.family).load_runner().load(spec, torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@dataclass(frozen=True)
class JobStatus:
    """Where the job in an OUT stands (see `status`)."""

    out: str
    model: str
    done: int
    failed: int
    """Ids recorded under failures/ and not (since) in the index."""
    pending: int | None
    """Manifest rows neither done nor failed; None when no manifest was given."""
    failures: list[tuple[str, str, int]]
    """(id, error, attempts) of the failed rows, latest record per id, up to 20."""


def status(out: str, manifest: str | None = None) -> JobStatus:
    """Done, failed (latest error per id) and, given the `manifest`, pending rows of the job in `out`.

    Reads only OUT (and the manifest's ids): safe while a render is running. Raises UsageError
    when `out` holds no cogdist job.
    """
    location = open_location(out)
    if not location.exists(JOB_RECORD):
        raise UsageError(f"{location.public_uri} holds no cogdist job (no {JOB_RECORD})")
    settings = json.loads(location.read_bytes(JOB_RECORD))["settings"]
    model = settings["model"]
    done = done_ids(location)
    table = read_table(location, FAILURES)
    failures: list[tuple[str, str, int]] = []
    failed = 0
    if table is not None and table.num_rows:
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=done)))
        latest: dict[str, tuple[str, str, int]] = {}
        for row in table.sort_by("failed_at").to_pylist():
            latest[row["id"]] = (row["id"], row["error"], row["attempts"])
        failed = len(latest)
        failures = list(latest.values())[:20]
    pending = None
    if manifest is not None:
        failed_ids = table["id"].combine_chunks() if table is not None else pa.array([], pa.string())
        # The manifest is read as the job reads it: through its --column-map.
        source = ManifestSource(manifest, column_map=settings.get("column_map"))
        pending = scan_pending(source, done, failed_ids, settings.get("samples") or 1).pending
    return JobStatus(location.public_uri, model, len(done), failed, pending, failures)


def report(
    out: str,
    *,
    html: str | None = None,
    png: str | None = None,
    thumbnails: int = 24,
    samples: int | None = None,
) -> ReportFiles:
    """Write an HTML page (default OUT/report.html) and a PNG (default OUT/report.png) of the job in
    `out`: throughput over time, busy fraction per replica, failures by reason, `thumbnails` of
    its outputs (`samples`: the older name of `thumbnails`)."""
    from cogdist.reporting import write_report  # matplotlib: loaded only when a report is made

    return write_report(out, html, png, thumbnails if samples is None else samples)
