"""The job record: the settings OUT was started with, so a resume cannot silently mix outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from cogdist._version import __version__
from cogdist.errors import ResumeConflictError
from cogdist.sink.dataset import SHARD_FOLDERS
from cogdist.sink.ledger import FAILURES, INDEX, now_utc
from cogdist.sink.naming import OUTPUTS
from cogdist.storage import Location

JOB_RECORD = "_cogdist/job.json"
OWNED = (
    INDEX,
    FAILURES,
    OUTPUTS,
    *SHARD_FOLDERS.values(),
    "_cogdist",
)  # what --overwrite removes; nothing else in OUT
REPORT_HTML = "report.html"
REPORT_PNG = "report.png"
OWNED_FILES = (REPORT_HTML, REPORT_PNG)  # `cogdist report`'s default files, which --overwrite removes too


@dataclass(frozen=True)
class JobSettings:
    """Settings that change what an output looks like. Equal settings: a resume may continue."""

    model: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    format: str
    quality: int
    dtype: str
    columns: tuple[str, ...]
    """The manifest's columns, which shape the index."""
    num_frames: int | None = None
    fps: float | None = None
    vae_tiling: bool = False
    """Tiled decoding blends tiles, which changes pixels slightly."""
    save_frames: bool = False
    dataset: str | None = None
    """--dataset webdataset or parquet; None: one file per row."""
    cache: str | None = None
    """--cache: a step cache skips transformer work and changes pixels; None: no cache."""
    cache_threshold: float | None = None


_FLAGS = {
    "model": "--model",
    "width": "--width",
    "height": "--height",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "format": "--format",
    "quality": "--quality",
    "dtype": "--dtype",
    "columns": "the manifest's columns",
    "num_frames": "--frames",
    "fps": "--fps",
    "vae_tiling": "--vae-tiling",
    "save_frames": "--save-frames",
    "dataset": "--dataset",
    "cache": "--cache",
    "cache_threshold": "--cache-threshold",
}


def check_resume(out: Location, settings: JobSettings) -> bool:
    """True when OUT already holds this job; raise ResumeConflictError when it holds another."""
    if not out.exists(JOB_RECORD):
        return False
    recorded = json.loads(out.read_bytes(JOB_RECORD))["settings"]
    ours = asdict(settings)
    ours["columns"] = list(settings.columns)
    # A setting an older record lacks was off (or did not apply) then.
    differences = [
        f"  {_FLAGS[name]}: {recorded.get(name)!r} in OUT, {value!r} now"
        for name, value in ours.items()
        if recorded.get(name) != value and (name in recorded or value)
    ]
    if differences:
        raise ResumeConflictError(
            f"{out.public_uri} holds a job started with other settings, so its outputs would not "
            "match this run's:\n" + "\n".join(differences) + "\n"
            "Run with the original settings to resume it, pass --overwrite to start over "
            "(removes its outputs, index and failures), or choose another --out."
        )
    return True


def write_job_record(out: Location, settings: JobSettings) -> None:
    record = {
        "settings": {**asdict(settings), "columns": list(settings.columns)},
        "cogdist_version": __version__,
        "created_at": now_utc().isoformat(),
    }
    out.write_bytes(JOB_RECORD, json.dumps(record, indent=2).encode(), durable=True)


def clear_outputs(out: Location) -> None:
    """Start over: remove everything cogdist wrote under OUT (and nothing else)."""
    for folder in OWNED:
        out.delete_tree(folder)
    for name in OWNED_FILES:
        out.delete(name)
