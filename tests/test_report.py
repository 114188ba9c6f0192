"""`cogdist report`: the page and the PNG of real jobs (an image job, a video job with failures),
checked as files and as headless Chromium renders them; the busy-fraction arithmetic on its own."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

import cogdist
from cogdist.cli import main
from cogdist.errors import UsageError
from cogdist.reporting.numbers import failure_reasons, replica_busy, work_units
from cogdist.sink.job import clear_outputs
from cogdist.storage import open_location
from tests.conftest import probe_mp4, write_manifest

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1400, 2400)

# The tests share a module fixture: one test process runs them all.
pytestmark = pytest.mark.xdist_group("report-jobs")


@pytest.fixture(scope="module")
def jobs(ray_session, tmp_path_factory) -> dict[str, Path]:
    """Two small real jobs: tiny-cogview4 images, and tiny-cogvideox videos with three rows that
    fail for good (two for the same missing input, one for an input that is not a video)."""
    folder = tmp_path_factory.mktemp("report-jobs")
    images = [
        {"id": "img/lighthouse", "prompt": "a lighthouse at dusk, long exposure, " * 3, "seed": 1},
        {"id": "img/fox", "prompt": "a red fox in the snow", "seed": 2},
        {"id": "img/wide", "prompt": "a wide field of sunflowers", "width": 128, "height": 64, "seed": 3},
    ]
    cogdist.render(
        str(write_manifest(folder / "images.parquet", images)),
        model="tiny-cogview4",
        out=str(folder / "images"),
        width=64,
        height=64,
        steps=2,
        replicas=1,
        progress=False,
    )
    (folder / "not-a-video.mp4").write_bytes(b"these bytes are no video")
    videos = [
        {"id": "vid/fox", "prompt": "a red fox running", "seed": 1},
        {"id": "v2v/missing-1", "prompt": "x", "video": str(folder / "missing.mp4")},
        {"id": "v2v/missing-2", "prompt": "x", "video": str(folder / "missing.mp4")},
        {"id": "v2v/garbage", "prompt": "x", "video": str(folder / "not-a-video.mp4")},
    ]
    summary = cogdist.render(
        str(write_manifest(folder / "videos.parquet", videos)),
        model="tiny-cogvideox",
        out=str(folder / "videos"),
        width=64,
        height=64,
        frames=9,
        steps=2,
        replicas=1,
        max_retries=0,
        progress=False,
    )
    assert (summary.done, summary.failed) == (1, 3)
    return {"images": folder / "images", "videos": folder / "videos", "folder": folder}


# -- helpers: the page's pictures, Chromium, finding a picture in a screenshot ------------------------


class Pictures(HTMLParser):
    """Every <img> of a page, its attributes and its decoded data URI."""

    def __init__(self, page: str):
        super().__init__()
        self.images: list[dict] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            attributes = dict(attrs)
            header, _, data = attributes["src"].partition(",")
            assert header.startswith("data:image/") and header.endswith(";base64"), header[:80]
            attributes["image"] = Image.open(io.BytesIO(base64.b64decode(data)))
            self.images.append(attributes)

    def by(self, name: str, value: str) -> dict:
        found = [image for image in self.images if image.get(name) == value]
        assert len(found) == 1, f"{len(found)} images with {name}={value!r}"
        return found[0]


def chromium(page: Path, tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    """Open `page` in headless Chromium: `mode` is --dump-dom or --screenshot=PATH."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does)"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        mode,
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    shot = tmp_path / f"{page.stem}-shot.png"
    chromium(page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.shape == (WINDOW[1], WINDOW[0], 3)
    assert pixels.std() > 20, "the screenshot is blank"
    return pixels


def locate(screen: np.ndarray, picture: Image.Image) -> tuple[int, int, float]:
    """(x, y) where `picture` best matches `screen` (least squared difference of grey levels, by
    FFT), and the mean absolute RGB difference there."""
    template = np.asarray(picture.convert("RGB")).astype(float)
    height, width = template.shape[:2]
    grey, grey_template = screen.mean(axis=2), template.mean(axis=2)
    spectrum = np.fft.rfft2(grey) * np.conj(np.fft.rfft2(grey_template, s=grey.shape))
    products = np.fft.irfft2(spectrum, s=grey.shape)[
        : grey.shape[0] - height + 1, : grey.shape[1] - width + 1
    ]
    squares = np.pad(grey**2, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    windows = (
        squares[height:, width:]
        - squares[:-height, width:]
        - squares[height:, :-width]
        + squares[:-height, :-width]
    )
    differences = windows - 2 * products + (grey_template**2).sum()
    y, x = np.unravel_index(np.argmin(differences), differences.shape)
    return int(x), int(y), float(np.abs(screen[y : y + height, x : x + width] - template).mean())


def output_image(out: Path, item_id: str) -> np.ndarray:
    table = ds.dataset(out / "index").to_table(filter=ds.field("id") == item_id)
    return np.asarray(Image.open(out / table["path"][0].as_py()).convert("RGB")).astype(float)


def assert_self_contained(page: str) -> None:
    assert not re.search(r"https?://", page), "the page names a web address"
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    for value in re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page):
        assert value.startswith("data:"), f"a reference to {value[:80]!r}"


# -- the tests --------------------------------------------------------------------------------------------


def test_image_job_report_renders_in_chromium_with_its_charts_and_thumbnails(jobs, tmp_path, capsys):
    out = jobs["images"]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["report", str(out)]) == 0  # the CLI in-process: a subprocess costs seconds of imports
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installs its own
    printed = capsys.readouterr().out
    assert "report of 3 done and 0 failed rows" in printed
    assert str(out / "report.html") in printed and str(out / "report.png") in printed
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert "tiny-cogview4" in page and "3 done, 0 failed" in page and "No row has failed." in page
    # The nodes the rows were rendered on (the index's node column): one node, all 3 rows.
    assert re.search(r"<th>nodes</th><td>1 \(\w{8}: 3 rows\)</td>", page), page[:3000]

    png = Image.open(out / "report.png")
    assert png.format == "PNG" and png.width == 1400 and 900 < png.height < 3000
    assert np.asarray(png.convert("L")).std() > 20

    pictures = Pictures(page)
    assert {p["alt"] for p in pictures.images if p.get("class") == "chart"} == {
        "throughput chart",
        "busy chart",
    }
    thumbnails = {p["data-id"]: p for p in pictures.images if "data-id" in p}
    assert sorted(thumbnails) == ["img/fox", "img/lighthouse", "img/wide"]
    # Thumbnails are drawn 1:1: the size the page gives is the picture's own, 160 px on the long side.
    for item_id, size in (("img/fox", (160, 160)), ("img/wide", (160, 80))):
        assert thumbnails[item_id]["image"].size == size
        assert (int(thumbnails[item_id]["width"]), int(thumbnails[item_id]["height"])) == size
    # Each thumbnail is its own output, enlarged: shrunk back it matches it, not another row's.
    fox, lighthouse = output_image(out, "img/fox"), output_image(out, "img/lighthouse")
    shrunk = np.asarray(thumbnails["img/fox"]["image"].convert("RGB").resize((64, 64), Image.BOX)).astype(
        float
    )
    assert np.abs(shrunk - fox).mean() < 8 < np.abs(shrunk - lighthouse).mean()

    screen = screenshot(out / "report.html", tmp_path)
    for picture in (thumbnails["img/fox"], thumbnails["img/wide"], pictures.by("id", "chart-throughput")):
        x, y, difference = locate(screen, picture["image"])
        assert difference < 2, (
            f"{picture['alt']} is not on the screen (best match {difference:.1f} at {x},{y})"
        )
    # The charts are charts: several colours, text and bars, not an empty frame.
    for chart in ("chart-throughput", "chart-busy"):
        pixels = np.asarray(pictures.by("id", chart)["image"].convert("RGB"))
        assert pixels.shape[1] == 1000 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
        assert (pixels < 128).mean() > 0.005


def test_video_job_report_shows_failures_by_reason_and_animated_previews(jobs, tmp_path):
    out = jobs["videos"]
    files = cogdist.report(str(out), html=str(tmp_path / "page.html"), png=str(tmp_path / "page.png"))
    assert (files.html, files.png, files.done, files.failed) == (
        str(tmp_path / "page.html"),
        str(tmp_path / "page.png"),
        1,
        3,
    )
    assert not (out / "report.html").exists() and Image.open(tmp_path / "page.png").width == 1400
    page = (tmp_path / "page.html").read_text()
    assert_self_contained(page)

    dom = chromium(tmp_path / "page.html", tmp_path, "--dump-dom").stdout
    missing = f"video cannot be read: {jobs['folder'] / 'missing.mp4'} does not exist"
    garbage = f"video {jobs['folder'] / 'not-a-video.mp4'} cannot be decoded"
    rows = re.findall(r'<td class="count">(\d+)</td><td class="reason">([^<]*)</td><td>([^<]*)</td>', dom)
    assert [(count, reason.split(":")[0]) for count, reason, _ in rows] == [
        ("2", "video cannot be read"),
        ("1", f"video {jobs['folder'] / 'not-a-video.mp4'} cannot be decoded"),
    ]
    assert rows[0][1] == missing and rows[0][2] == "v2v/missing-1, v2v/missing-2" and garbage in rows[1][1]
    assert "1 done, 3 failed" in dom and "Busy fraction of a replica" in dom

    pictures = Pictures(page)
    charts = {p["id"] for p in pictures.images if p.get("class") == "chart"}
    assert charts == {"chart-throughput", "chart-busy", "chart-failures"}
    preview = pictures.by("data-id", "vid/fox")["image"]
    assert preview.format == "WEBP" and preview.is_animated and preview.n_frames == 8
    _, frames = probe_mp4(out / ds.dataset(out / "index").to_table()["path"][0].as_py())
    preview.seek(0)
    first = np.asarray(preview.convert("RGB").resize((64, 64), Image.BOX)).astype(float)
    assert np.abs(first - frames[0]).mean() < 10  # the first frame of the video, lossy


def test_report_of_an_s3_out(jobs, s3_bucket):
    destination = open_location(f"s3://{s3_bucket}/job")
    pafs.copy_files(str(jobs["videos"]), destination.root, destination_filesystem=destination.fs)
    files = cogdist.report(f"s3://{s3_bucket}/job")
    assert (files.html, files.png) == (
        f"s3://{s3_bucket}/job/report.html",
        f"s3://{s3_bucket}/job/report.png",
    )
    page = destination.read_bytes("report.html").decode()
    assert "video cannot be read" in page and "1 done, 3 failed" in page
    assert Pictures(page).by("data-id", "vid/fox")["image"].is_animated
    assert Image.open(io.BytesIO(destination.read_bytes("report.png"))).width == 1400
    # --overwrite starts the job over: the default report files go with the rest.
    clear_outputs(destination)
    assert not destination.exists("report.html") and not destination.exists("report.png")


def test_report_of_no_job_no_done_rows_and_an_old_single_row_index(jobs, tmp_path):
    with pytest.raises(UsageError, match="holds no cogdist job"):
        cogdist.report(str(tmp_path / "nothing-here"))

    # Everything failed so far: the page says so and still lists the failures.
    failed_only = tmp_path / "failed-only"
    for folder in ("_cogdist", "failures"):
        shutil.copytree(jobs["videos"] / folder, failed_only / folder)
    files = cogdist.report(str(failed_only))
    assert (files.done, files.failed) == (0, 3)
    page = (failed_only / "report.html").read_text()
    assert "No row has finished yet" in page and "video cannot be read" in page
    assert [p["id"] for p in Pictures(page).images] == ["chart-failures"]

    # One row, in an index written before cogdist recorded replicas: no busy fractions, said why.
    old = tmp_path / "old"
    for folder in ("_cogdist", "outputs"):
        shutil.copytree(jobs["images"] / folder, old / folder)
    table = ds.dataset(jobs["images"] / "index").to_table(filter=ds.field("id") == "img/fox")
    (old / "index").mkdir()
    pq.write_table(table.drop_columns(["replica"]), old / "index" / "part-0.parquet")
    files = cogdist.report(str(old), samples=5)
    page = (old / "report.html").read_text()
    assert (files.done, files.failed) == (1, 0) and "no replica column" in page
    pictures = Pictures(page)
    assert [p["id"] for p in pictures.images if p.get("class") == "chart"] == ["chart-throughput"]
    assert [p["data-id"] for p in pictures.images if "data-id" in p] == ["img/fox"]
    assert "1 run" in page and Image.open(old / "report.png").width == 1400


def test_busy_fraction_counts_batches_once_and_not_the_time_between_runs():
    # Replica 0: ten 10 s rows back to back; then, after a stop of hours, five 8 s rows 2 s apart.
    first = [(10.0 * (i + 1), 10.0) for i in range(10)]
    second = [(10_000.0 + 10 * (i + 1), 8.0) for i in range(5)]
    # Replica 1: two batches of two rows; each row holds half of its batch's 6 s.
    batches = [(106.0, 3.0), (106.0, 3.0), (112.0, 3.0), (112.0, 3.0)]
    rows = [(*row, 0) for row in first + second] + [(*row, 1) for row in batches]
    finished, seconds, replicas = (np.array(column) for column in zip(*rows))

    zero, one = replica_busy(finished, seconds, replicas, idle_gap=300)
    assert (zero.rows, zero.spans, zero.busy_seconds) == (15, 2, 140.0)
    assert zero.active_seconds == pytest.approx(100 + (10_050 - 10_002))  # the stop is not counted
    assert zero.fraction == pytest.approx(140 / 148)
    assert work_units(finished[replicas == 1], seconds[replicas == 1]) == [(100.0, 106.0), (106.0, 112.0)]
    assert (one.spans, one.active_seconds, one.fraction) == (1, 12.0, 1.0)
    # Without the split the hours between the runs would count as idle.
    (joined, _) = replica_busy(finished, seconds, replicas, idle_gap=1e6)
    assert joined.spans == 1 and joined.fraction == pytest.approx(140 / 10_050)


def test_failure_reasons_group_by_first_line_and_skip_ids_done_since():
    failures = pa.table(
        {
            "id": ["a", "b", "c", "c", "d"],
            "error": [
                "OSError: disk\ntrace",
                "OSError: disk  \nother trace",
                "old reason",
                "  ValueError: x",
                "",
            ],
            "failed_at": pa.array([1, 2, 3, 4, 5], pa.timestamp("ms", tz="UTC")),
        }
    )
    reasons = failure_reasons(failures, pa.array(["b"]))
    assert [(r.reason, r.ids) for r in reasons] == [
        ("(no message)", ["d"]),
        ("OSError: disk", ["a"]),
        ("ValueError: x", ["c"]),  # the latest record of c
    ]
