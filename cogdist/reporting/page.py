"""The report's HTML page and PNG: matplotlib charts drawn into axes that both share."""

from __future__ import annotations

import html
import io
from datetime import datetime, timezone

import numpy as np
from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cogdist.reporting.numbers import (
    FailureReason,
    JobData,
    ReplicaBusy,
    Summary,
    replica_busy,
    summarize,
    throughput_bins,
)
from cogdist.reporting.thumbnails import Thumbnail, data_uri

DPI = 100
CHART_WIDTH_INCHES = 10.0
MAX_REASONS_CHARTED = 12
MAX_REASONS_LISTED = 50

# -- charts (matplotlib, drawn into axes so that the page and the PNG share them) ---------------------


def draw_throughput(ax: Axes, job: JobData, summary: Summary) -> None:
    width, starts, counts = throughput_bins(job.finished, summary.active_seconds)
    times = [datetime.fromtimestamp(t, timezone.utc) for t in starts]
    ax.bar(
        times, counts, width=width / 86400, align="edge", color="#3b73b9", edgecolor="white", linewidth=0.5
    )
    # From the first row's start, so that the time to the first finished row shows as a gap.
    first = datetime.fromtimestamp(min(summary.first_start, starts[0]), timezone.utc)
    ax.set_xlim(first, datetime.fromtimestamp(max(summary.last_finish, starts[-1] + width), timezone.utc))
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_ylabel(f"rows per {_duration(width)}")
    ax.set_title(f"Throughput: rows finished per {_duration(width)} (UTC)", loc="left")
    ax.grid(axis="y", alpha=0.3)


def draw_busy(ax: Axes, busy: list[ReplicaBusy]) -> None:
    labels = [f"replica {b.replica}" if b.replica >= 0 else "replica ?" for b in busy]
    fractions = [b.fraction for b in busy]
    ax.barh(labels, fractions, color="#4c9a5b")
    for y, b in enumerate(busy):
        ax.text(
            0.01,
            y,
            f"{b.fraction:.0%}  ({_duration(b.busy_seconds)} busy of {_duration(b.active_seconds)} active, "
            f"{b.rows} rows, {b.spans} span{'s' if b.spans != 1 else ''})",
            va="center",
            fontsize=9,
            color="white" if b.fraction > 0.6 else "black",
        )
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("busy fraction")
    ax.set_title("Busy fraction per replica", loc="left")


def draw_failures(ax: Axes, reasons: list[FailureReason]) -> None:
    shown = reasons[:MAX_REASONS_CHARTED]
    ax.barh([_shorten(r.reason, 70) for r in shown], [len(r.ids) for r in shown], color="#c0504d")
    ax.invert_yaxis()
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("failed rows")
    more = f" (top {len(shown)} of {len(reasons)})" if len(reasons) > len(shown) else ""
    ax.set_title(f"Failures by reason{more}", loc="left")


def draw_message(ax: Axes, title: str, message: str) -> None:
    ax.axis("off")
    ax.set_title(title, loc="left")
    ax.text(0.0, 0.5, message, va="center", fontsize=11, color="#555555", wrap=True)


def _busy_height(count: int) -> float:
    return 1.2 + 0.35 * count


# -- the page and the PNG ------------------------------------------------------------------------------


def header_lines(job: JobData, summary: Summary | None) -> list[tuple[str, str]]:
    settings = job.settings
    lines = [("model", str(settings.get("model", "?")))]
    shape = f"{settings.get('width')}x{settings.get('height')}, {settings.get('num_inference_steps')} steps"
    if settings.get("num_frames"):
        shape += f", {settings['num_frames']} frames @ {settings.get('fps')} fps"
    lines.append(("defaults", f"{shape}, {settings.get('format')}"))
    lines.append(("rows", f"{job.done} done, {job.failed} failed"))
    if job.nodes:
        shown = ", ".join(f"{node[:8]}: {rows} rows" for node, rows in list(job.nodes.items())[:8])
        more = f", {len(job.nodes) - 8} more" if len(job.nodes) > 8 else ""
        lines.append(("nodes", f"{len(job.nodes)} ({shown}{more})"))
    if summary is None:
        lines.append(("time", "no row has finished yet"))
    else:
        wall = summary.last_finish - summary.first_start
        lines.append(
            ("time", f"{_when(summary.first_start)} to {_when(summary.last_finish)} UTC ({_duration(wall)})")
        )
        sessions = f"{summary.sessions} run{'s' if summary.sessions != 1 else ''}"
        lines.append(("active", f"{_duration(summary.active_seconds)} in {sessions}"))
        if summary.active_seconds > 0:
            rate = f"{job.done / summary.active_seconds:.3g} rows/s over the active time"
        else:  # rows that recorded no render time
            rate = "unknown (no render time recorded)"
        lines.append(("throughput", rate))
    if job.created_at:
        lines.append(("job started", job.created_at))
    return lines


def busy_explanation(idle_gap: float) -> str:
    return (
        "Busy fraction of a replica: the sum of its rows' render_seconds (the pipeline's time for a row, "
        "from prompt encoding to decoded pixels) divided by its active time. A row's reading of inputs, "
        "encoding and storing (io_seconds) overlap the next unit's render, so they are not busy time. "
        "Active time runs from the start of its first unit (finished_at minus the unit's render and I/O "
        "time) to its "
        f"last finished_at, split wherever it finished nothing for more than {_duration(idle_gap)} "
        "(a stop between resumed runs, a rebuild), so that time between runs does not count. What is "
        "left below 100% is time the replica waited: for work, for the driver, for Ray."
    )


def render_page(job: JobData, thumbnails: list[Thumbnail], idle_gap: float) -> str:
    summary = summarize(job, idle_gap)
    title = f"cogdist report: {job.settings.get('model', '?')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="where">{_e(job.out)} &middot; report written {_e(_when(_now()))} UTC</p>',
        '<table class="facts">',
        *(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in header_lines(job, summary)),
        "</table>",
    ]
    if summary is None:
        parts.append(
            '<p class="empty">No row has finished yet: no throughput, no busy fractions, no samples.</p>'
        )
    else:
        figure = Figure(figsize=(CHART_WIDTH_INCHES, 3.2), dpi=DPI, layout="constrained")
        draw_throughput(figure.add_subplot(), job, summary)
        parts += ['<section id="throughput"><h2>Throughput</h2>', _chart(figure, "throughput"), "</section>"]
        parts.append('<section id="replicas"><h2>Replicas</h2>')
        if job.replicas is None:
            parts.append(f'<p class="empty">{_e(_NO_REPLICAS)}</p>')
        else:
            busy = replica_busy(job.finished, job.seconds, job.replicas, idle_gap, job.io)
            figure = Figure(
                figsize=(CHART_WIDTH_INCHES, _busy_height(len(busy))), dpi=DPI, layout="constrained"
            )
            draw_busy(figure.add_subplot(), busy)
            parts.append(_chart(figure, "busy"))
        parts += [f'<p class="note">{_e(busy_explanation(idle_gap))}</p>', "</section>"]
    parts.append('<section id="failures"><h2>Failures</h2>')
    if not job.reasons:
        parts.append('<p class="empty">No row has failed.</p>')
    else:
        shown = min(len(job.reasons), MAX_REASONS_CHARTED)
        figure = Figure(figsize=(CHART_WIDTH_INCHES, _busy_height(shown)), dpi=DPI, layout="constrained")
        draw_failures(figure.add_subplot(), job.reasons)
        parts += [
            _chart(figure, "failures"),
            '<table class="reasons"><tr><th>rows</th><th>reason</th><th>ids</th></tr>',
        ]
        for reason in job.reasons[:MAX_REASONS_LISTED]:
            examples = ", ".join(reason.ids[:3]) + (
                f", ... ({len(reason.ids) - 3} more)" if len(reason.ids) > 3 else ""
            )
            parts.append(
                f'<tr><td class="count">{len(reason.ids)}</td><td class="reason">{_e(reason.reason)}</td>'
                f"<td>{_e(examples)}</td></tr>"
            )
        parts.append("</table>")
        if len(job.reasons) > MAX_REASONS_LISTED:
            parts.append(f"<p>... and {len(job.reasons) - MAX_REASONS_LISTED} more reasons.</p>")
    parts.append("</section>")
    if thumbnails:
        parts.append(
            f'<section id="samples"><h2>Samples</h2><p class="note">{len(thumbnails)} of {job.done} rows, '
            'chosen by the hash of their id; videos play a few of their frames.</p><div class="sheet">'
        )
        parts += [_figure_html(t) for t in thumbnails]
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_png(job: JobData, thumbnails: list[Thumbnail], idle_gap: float) -> bytes:
    """The page as one PNG: the header, the same charts, and the contact sheet's stills."""
    summary = summarize(job, idle_gap)
    busy = None
    if summary is not None and job.replicas is not None:
        busy = replica_busy(job.finished, job.seconds, job.replicas, idle_gap, job.io)
    columns = 8
    sheet_rows = -(-len(thumbnails) // columns)
    heights = [
        1.8,
        3.2 if summary else 1.2,
        _busy_height(len(busy)) if busy else 1.2,
        _busy_height(min(len(job.reasons), MAX_REASONS_CHARTED)) if job.reasons else 1.2,
    ]
    heights += [2.3 * sheet_rows] if sheet_rows else []
    figure = Figure(figsize=(14, sum(heights)), dpi=DPI, layout="constrained")
    panels = figure.subfigures(len(heights), 1, height_ratios=heights)
    header = panels[0].add_subplot()
    header.axis("off")
    header.text(
        0, 1, f"cogdist report: {job.settings.get('model', '?')}", fontsize=16, weight="bold", va="top"
    )
    facts = "\n".join(f"{k}: {v}" for k, v in header_lines(job, summary))
    header.text(0, 0.72, facts, fontsize=10, va="top", family="monospace")
    if summary is None:
        draw_message(panels[1].add_subplot(), "Throughput", "No row has finished yet.")
    else:
        draw_throughput(panels[1].add_subplot(), job, summary)
    if busy:
        draw_busy(panels[2].add_subplot(), busy)
    else:
        draw_message(
            panels[2].add_subplot(),
            "Busy fraction per replica",
            "No row has finished yet." if summary is None else _NO_REPLICAS,
        )
    if job.reasons:
        draw_failures(panels[3].add_subplot(), job.reasons)
    else:
        draw_message(panels[3].add_subplot(), "Failures by reason", "No row has failed.")
    if sheet_rows:
        axes = panels[4].subplots(sheet_rows, columns, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, thumbnail in zip(axes.ravel(), thumbnails):
            if thumbnail.still is not None:
                ax.imshow(np.asarray(thumbnail.still))
            else:
                ax.text(
                    0.5, 0.5, _shorten(thumbnail.note, 40), ha="center", va="center", fontsize=7, wrap=True
                )
            ax.set_title(f"{_shorten(thumbnail.id, 28)}\n{_shorten(thumbnail.prompt, 28)}", fontsize=7)
    return _figure_bytes(figure)


# -- small helpers -------------------------------------------------------------------------------------

_NO_REPLICAS = (
    "This OUT's index has no replica column (it was written before cogdist recorded which replica "
    "rendered a row), so busy fractions cannot be computed."
)

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 28px; border-bottom: 1px solid #ddd; }
p.where { color: #666; margin-top: 0; } p.note { color: #555; max-width: 1000px; font-size: 14px; }
p.empty { color: #555; font-style: italic; }
table.facts th { text-align: left; padding-right: 16px; font-weight: normal; color: #666; }
table.reasons { border-collapse: collapse; font-size: 14px; }
table.reasons td, table.reasons th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
td.count { text-align: right; } td.reason { font-family: monospace; }
img.chart { display: block; }
div.sheet { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 170px; font-size: 12px; }
figure img { display: block; image-rendering: pixelated; }
figure .missing { width: 160px; height: 160px; background: #eee; color: #777; font-size: 11px; overflow: hidden; }
figcaption { word-break: break-all; } figcaption .prompt { color: #666; word-break: normal; }
"""


def _chart(figure: Figure, name: str) -> str:
    data = _figure_bytes(figure)
    width, height = Image.open(io.BytesIO(data)).size
    return (
        f'<img class="chart" id="chart-{name}" width="{width}" height="{height}" alt="{name} chart" '
        f'src="{data_uri(data, "image/png")}">'
    )


def _figure_html(thumbnail: Thumbnail) -> str:
    if thumbnail.data_uri:
        width, height = thumbnail.still.size
        picture = (
            f'<img width="{width}" height="{height}" alt="{_e(thumbnail.id)}" data-id="{_e(thumbnail.id)}" '
            f'src="{thumbnail.data_uri}">'
        )
    else:
        picture = f'<div class="missing">{_e(thumbnail.note)}</div>'
    note = f" ({_e(thumbnail.note)})" if thumbnail.note and thumbnail.data_uri else ""
    return (
        f"<figure>{picture}<figcaption>{_e(_shorten(thumbnail.id, 60))}{note}<br>"
        f'<span class="prompt">{_e(_shorten(thumbnail.prompt, 80))}</span></figcaption></figure>'
    )


def _figure_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _now() -> float:
    return datetime.now(timezone.utc).timestamp()


def _when(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    units = ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"))
    for (size, name), (smaller, smaller_name) in zip(units, units[1:]):
        if seconds >= size:
            whole, rest = int(seconds // size), int(seconds % size // smaller)
            return f"{whole} {name} {rest} {smaller_name}" if rest else f"{whole} {name}"
    raise AssertionError("unreachable")
