"""`cogdist report OUT`: one self-contained HTML page and one PNG that show how a job went.

Everything comes from OUT alone (the index, the failure records and the job record, read with the
same code as `cogdist status`), so a report can be made of a finished job, of one still running
or of one whose machines are long gone, local or on an object store. The page embeds its charts
and thumbnails as data URIs: it can be mailed or attached to an issue and opened offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

from cogdist.errors import UsageError
from cogdist.reporting.numbers import IDLE_GAP_SECONDS, pick_samples, read_job
from cogdist.reporting.page import render_page, render_png
from cogdist.reporting.thumbnails import read_thumbnails
from cogdist.sink.job import REPORT_HTML, REPORT_PNG
from cogdist.storage import Location, open_location


@dataclass(frozen=True)
class ReportFiles:
    html: str
    """Where the page was written (a path or URI without credentials)."""
    png: str
    done: int
    failed: int


def write_report(
    out: str,
    html_to: str | None = None,
    png_to: str | None = None,
    samples: int = 24,
    idle_gap: float = IDLE_GAP_SECONDS,
) -> ReportFiles:
    """Write the page (default OUT/report.html) and the PNG (default OUT/report.png) of the job in OUT."""
    if samples < 0:
        raise UsageError(f"--samples must be 0 or more, not {samples}")
    location = open_location(out)
    job = read_job(location)
    thumbnails = read_thumbnails(location, pick_samples(job.ids, samples))
    written = []
    for target, default, data in (
        (html_to, REPORT_HTML, render_page(job, thumbnails, idle_gap).encode("utf-8")),
        (png_to, REPORT_PNG, render_png(job, thumbnails, idle_gap)),
    ):
        folder, name = (location, default) if target is None else _open_target(target)
        folder.write_bytes(name, data)
        written.append(folder.uri_of(name))
    return ReportFiles(html=written[0], png=written[1], done=job.done, failed=job.failed)


def _open_target(target: str) -> tuple[Location, str]:
    """The folder and file name of a path or URI to write to."""
    if "://" not in target:
        path = os.path.abspath(os.path.expanduser(target))
        folder, name = os.path.split(path)
        return open_location(folder), name
    parsed = urlparse(target)
    folder, _, name = parsed.path.rpartition("/")
    if not name:
        raise UsageError(f"{target!r} names a folder; give a file name, as in s3://bucket/prefix/report.html")
    return open_location(parsed._replace(path=folder).geturl()), name
