"""The job record: the settings OUT was started with, so a resume cannot silently mix outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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
    """What OUT's job was started with (derived from the option declarations, cogdist.options)."""

    settings: dict[str, Any]
    """What shapes the outputs and the index (job.json's "settings"): a resume must match them."""
    flags: dict[str, str]
    """How a conflict message names each key of `settings` (e.g. "--steps")."""
    recorded: dict[str, Any] = field(default_factory=dict)
    """Options kept for the record (job.json's "recorded"): a resume may change them."""


def check_resume(out: Location, settings: JobSettings) -> bool:
    """True when OUT already holds this job; raise ResumeConflictError when it holds another."""
    if not out.exists(JOB_RECORD):
        return False
    recorded = json.loads(out.read_bytes(JOB_RECORD))["settings"]
    # A setting an older record lacks was off (or did not apply) then.
    differences = [
        f"  {settings.flags[name]}: {recorded.get(name)!r} in OUT, {value!r} now"
        for name, value in settings.settings.items()
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


def recorded_setting(out: Location, name: str, missing: Any = None) -> Any:
    """OUT's job record's setting `name`; `missing` without a record (a new job)."""
    if not out.exists(JOB_RECORD):
        return missing
    return json.loads(out.read_bytes(JOB_RECORD))["settings"].get(name)


def update_job_setting(out: Location, name: str, value: Any) -> None:
    """Set one setting of OUT's job record (a value the job's first worker resolved)."""
    record = json.loads(out.read_bytes(JOB_RECORD))
    record["settings"][name] = value
    out.write_bytes(JOB_RECORD, json.dumps(record, indent=2).encode(), durable=True)


def write_job_record(out: Location, settings: JobSettings) -> None:
    record = {
        "settings": settings.settings,
        "recorded": settings.recorded,
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
