"""Every task of the CogVideoX and GLM-Image families end to end through the CLI: outputs decoded and
checked (frames, size, fps), index rows complete, bad inputs failing only their rows, batch
independence, mixed-shape manifests, resume after a kill."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from cogdist.sink.encode import encode_video
from cogdist.sink.job import JOB_RECORD
from tests.conftest import (
    ROOT,
    cli,
    driver_env,
    kill_after_first_commit,
    probe_mp4,
    read_table,
    write_manifest,
)
from tests.inprocess import render_in_process

pytestmark = pytest.mark.e2e
LUMA = np.array([0.299, 0.587, 0.114])
# Where the replica count is not the point: one worker (a second costs its start-up).
ONE_REPLICA = ("--replicas", "1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Conditioning files: good ones in several formats, a truncated one of each kind, missing paths."""
    folder = tmp_path_factory.mktemp("inputs")
    x = np.linspace(0, 200, 64)[None, :, None]
    clip = np.stack([np.broadcast_to(x + 5 * i, (64, 64, 3)) for i in range(13)]).astype(np.uint8)
    (folder / "clip13.mp4").write_bytes(encode_video(clip, fps=8.0))
    (folder / "clip9.mp4").write_bytes(encode_video(clip[:9], fps=8.0))
    (folder / "corrupt.mp4").write_bytes((folder / "clip9.mp4").read_bytes()[:400])
    picture = Image.fromarray((np.random.RandomState(1).rand(80, 100, 3) * 255).astype(np.uint8))
    picture.save(folder / "cond.png")
    picture.resize((20, 20)).save(folder / "tiny.png")
    picture.save(folder / "cond.jpg", quality=90)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    (folder / "corrupt.png").write_bytes(buffer.getvalue()[:100])
    paths = {p.name: str(p) for p in folder.iterdir()}
    paths["missing.mp4"] = str(folder / "missing.mp4")
    paths["missing.png"] = str(folder / "missing.png")
    return paths


def probe(location, path: str) -> tuple[dict, np.ndarray]:
    """Decode the MP4 at `path` under `location` (local or S3) with ffmpeg."""
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"probe-{os.getpid()}-{time.monotonic_ns()}.mp4"
    local.write_bytes(location.read_bytes(path))
    try:
        return probe_mp4(local)
    finally:
        local.unlink()


def check_video_row(location, row: dict) -> np.ndarray:
    """The row's MP4 decodes to its frames, size and fps; its PNG frames match. Returns the PNGs."""
    meta, frames = probe(location, row["path"])
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p"), meta
    assert frames.shape == (row["num_frames"], row["height"], row["width"], 3), row["id"]
    assert meta["fps"] == pytest.approx(row["fps"], abs=0.01)
    assert row["duration"] == pytest.approx(row["num_frames"] / row["fps"])
    assert row["uri"] == location.uri_of(row["path"]) and row["model"].startswith("tiny-cogvideox")
    assert row["render_seconds"] > 0 and row["attempts"] >= 1
    if row["frames_path"] is None:
        return frames
    pngs = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(location.read_bytes(f"{row['frames_path']}/{i:06d}.png"))))
            for i in range(row["num_frames"])
        ]
    )
    assert not location.exists(f"{row['frames_path']}/{row['num_frames']:06d}.png")
    # The MP4 is the PNGs through H.264 and yuv420p, which halves colour resolution: compare luma.
    luma_png, luma_mp4 = pngs.astype(float) @ LUMA, frames.astype(float) @ LUMA
    assert np.abs(luma_png - luma_mp4).mean() < 4
    assert np.corrcoef(luma_png.ravel(), luma_mp4.ravel())[0, 1] > 0.97
    return pngs


def test_text_and_video_to_video_mixed_shapes_bad_inputs_and_batch_independence(tmp_path, inputs):
    rows = [
        {"id": "t2v/a", "prompt": "a red fox running", "seed": 1, "category": "animals"},
        {"id": "t2v/wide", "prompt": "waves", "width": 96, "height": 64, "num_frames": 17, "fps": 12.0},
        {"id": "t2v/b", "prompt": "a much longer prompt about a lighthouse at dusk", "seed": 2},
        {"id": "v2v/a", "prompt": "make it snow", "video": inputs["clip9.mp4"], "strength": 0.7},
        {"id": "v2v/corrupt", "prompt": "x", "video": inputs["corrupt.mp4"]},
        {"id": "v2v/missing", "prompt": "x", "video": inputs["missing.mp4"]},
    ]
    manifest = write_manifest(tmp_path / "mixed.parquet", rows)
    out = str(tmp_path / "out")
    command = ["render", str(manifest), "--model", "tiny-cogvideox", "--out", out, "--no-progress"]
    flags = ["--batch-size", "2", "--save-frames", "--max-retries", "1", *ONE_REPLICA]
    first = cli(*command, *flags)
    assert first.returncode == 1, first.stderr  # two rows failed, the rest finished
    assert "4 rendered, 0 already done, 2 failed of 6 rows" in first.stdout

    table, location = read_table(out)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == ["t2v/a", "t2v/b", "t2v/wide", "v2v/a"]
    assert by_id["t2v/a"]["category"] == "animals"  # extra columns carried
    assert {r["task"] for r in by_id.values()} == {"text-to-video", "video-to-video"}
    assert by_id["v2v/a"]["task"] == "video-to-video" and by_id["v2v/a"]["strength"] == 0.7
    assert (by_id["t2v/wide"]["width"], by_id["t2v/wide"]["num_frames"], by_id["t2v/wide"]["fps"]) == (
        96,
        17,
        12.0,
    )
    assert (by_id["t2v/a"]["num_frames"], by_id["t2v/a"]["fps"]) == (9, 8.0)  # the model's defaults
    frames = {item_id: check_video_row(location, row) for item_id, row in by_id.items()}

    failures, _ = read_table(out, "failures")
    errors = {row["id"]: row for row in failures.to_pylist()}
    assert sorted(errors) == ["v2v/corrupt", "v2v/missing"]
    assert (
        "cannot be decoded" in errors["v2v/corrupt"]["error"]
        and "corrupt.mp4" in errors["v2v/corrupt"]["error"]
    )
    assert "missing.mp4 does not exist" in errors["v2v/missing"]["error"]
    assert all(row["attempts"] == 2 for row in errors.values())  # first try + one retry

    # The same row alone (one worker, as a replica runs it) renders the same frames as in its
    # batch of two.
    alone = render_in_process([rows[0]], "tiny-cogvideox", tmp_path / "alone", save_frames=True)
    alone_frames = np.stack(
        [np.asarray(Image.open(path)) for path in sorted((tmp_path / "alone" / "outputs").rglob("*.png"))]
    )
    assert alone_frames.shape == frames["t2v/a"].shape and alone["t2v/a"].shape[0] == 9
    assert np.abs(alone_frames.astype(int) - frames["t2v/a"]).max() <= 1

    # Re-running resumes: nothing is rendered again; the fixed input renders with --retry-failed.
    again = cli(*command, *flags)
    assert again.returncode == 1 and "0 rendered, 4 already done, 0 failed, 2 failed earlier" in again.stdout
    Path(inputs["corrupt.mp4"]).write_bytes(Path(inputs["clip9.mp4"]).read_bytes())
    retried = cli(*command, *flags, "--retry-failed")
    assert retried.returncode == 1, retried.stderr  # the missing video is still missing
    assert "1 rendered, 4 already done, 1 failed of 6 rows" in retried.stdout
    table, _ = read_table(out)
    assert sorted(table["id"].to_pylist()) == ["t2v/a", "t2v/b", "t2v/wide", "v2v/a", "v2v/corrupt"]


def test_image_to_video_from_local_and_s3_inputs(tmp_path, inputs, s3_server, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=s3_bucket, Key="cond/frame.png", Body=Path(inputs["cond.png"]).read_bytes())
    rows = [
        {"id": "png", "prompt": "a fox turns its head", "image": inputs["cond.png"]},
        {"id": "jpg", "prompt": "a fox turns its head", "image": "file://" + inputs["cond.jpg"]},
        {"id": "s3", "prompt": "a fox turns its head", "image": f"s3://{s3_bucket}/cond/frame.png"},
        {"id": "corrupt", "prompt": "x", "image": inputs["corrupt.png"]},
        {"id": "missing", "prompt": "x", "image": f"s3://{s3_bucket}/cond/missing.png"},
    ]
    manifest = write_manifest(tmp_path / "i2v.parquet", rows)
    out = f"s3://{s3_bucket}/i2v-run"
    result = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-cogvideox-i2v",
        "--out",
        out,
        "--no-progress",
        "--max-retries",
        "0",
        *ONE_REPLICA,
    )
    assert result.returncode == 1, result.stderr
    assert "3 rendered, 0 already done, 2 failed of 5 rows" in result.stdout
    table, location = read_table(out)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == ["jpg", "png", "s3"]
    for row in by_id.values():
        assert row["task"] == "image-to-video" and row["uri"].startswith(f"s3://{s3_bucket}/i2v-run/outputs/")
        check_video_row(location, row)
    failures, _ = read_table(out, "failures")
    errors = {row["id"]: row["error"] for row in failures.to_pylist()}
    assert "corrupt.png cannot be decoded" in errors["corrupt"]
    assert f"s3://{s3_bucket}/cond/missing.png does not exist" in errors["missing"]
    assert "cogdist-test-secret" not in result.stdout + result.stderr + str(errors)


def test_cogvideox_15_traits_fps_16_and_video_to_video_frames(tmp_path, inputs):
    rows = [
        {"id": "t2v", "prompt": "a city at night"},
        {"id": "v2v", "prompt": "a city at night, snowing", "video": inputs["clip13.mp4"], "num_frames": 13},
    ]
    manifest = write_manifest(tmp_path / "m15.parquet", rows)
    out = str(tmp_path / "out")
    result = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-cogvideox1.5",
        "--out",
        out,
        "--no-progress",
        *ONE_REPLICA,
    )
    assert result.returncode == 0, result.stderr
    table, location = read_table(out)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert by_id["t2v"]["fps"] == 16.0 and by_id["t2v"]["num_frames"] == 9  # the preset default
    # 13 input frames -> 4 latent frames -> the VAE decodes 16 (as stock diffusers does); the
    # index records the frames the MP4 holds.
    assert by_id["v2v"]["num_frames"] == 16 and by_id["v2v"]["duration"] == 1.0
    for row in by_id.values():
        check_video_row(location, row)


def test_control_video_job_killed_mid_run_resumes_with_every_id_once(tmp_path, inputs):
    # The kill follows the first commit (one unit's rows): rows remain at any machine speed.
    n = 8
    rows = [
        {"id": f"pose/{i:02d}", "prompt": f"a dancer, take {i}", "video": inputs["clip9.mp4"], "seed": i}
        for i in range(n)
    ]
    manifest = write_manifest(tmp_path / "fun.parquet", rows)
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "cogdist", "render", str(manifest), "--model", "tiny-cogvideox-fun"]
    command += ["--out", out, "--no-progress", *ONE_REPLICA]
    # The driver joins a running cluster, whose workers outlive it until Ray ends its actors.
    committed = kill_after_first_commit(command, out, env=driver_env())
    assert 0 < committed < n

    resumed = subprocess.run(command, cwd=ROOT, env=driver_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed} already done" in resumed.stdout  # the journal's rows count as done
    table, location = read_table(out)
    assert sorted(table["id"].to_pylist()) == [f"pose/{i:02d}" for i in range(n)]  # every id, once
    for row in table.to_pylist():
        assert row["task"] == "control-to-video"
        check_video_row(location, row)
    stored = location.fs.get_file_info(pafs.FileSelector(location.path("outputs"), recursive=True))
    assert len([info for info in stored if info.type == pafs.FileType.File]) == n  # no strays


def test_glm_image_text_and_image_to_image_with_bad_inputs(tmp_path, inputs):
    rows = [
        {"id": "t2i/sign", "prompt": 'a shop sign that says "open"', "seed": 3},
        {"id": "t2i/wide", "prompt": "a panorama", "width": 96, "height": 32},
        {"id": "t2i/plain", "prompt": "a red fox", "seed": 4},
        {"id": "i2i/png", "prompt": "make it night", "image": inputs["cond.png"], "seed": 5},
        {"id": "i2i/jpg", "prompt": "make it night", "image": inputs["cond.jpg"], "seed": 6},
        {"id": "i2i/corrupt", "prompt": "x", "image": inputs["corrupt.png"]},
        {"id": "i2i/tiny", "prompt": "x", "image": inputs["tiny.png"]},
    ]
    manifest = write_manifest(tmp_path / "glm.parquet", rows)
    out = str(tmp_path / "out")
    result = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-glm-image",
        "--out",
        out,
        "--no-progress",
        "--batch-size",
        "2",
        "--prior-batch",
        "2",
        "--max-retries",
        "0",
        *ONE_REPLICA,
    )
    assert result.returncode == 1, result.stderr
    assert "5 rendered, 0 already done, 2 failed of 7 rows" in result.stdout
    table, location = read_table(out)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == ["i2i/jpg", "i2i/png", "t2i/plain", "t2i/sign", "t2i/wide"]
    images = {}
    for item_id, row in by_id.items():
        assert row["task"] == ("image-to-image" if item_id.startswith("i2i") else "text-to-image")
        assert row["num_frames"] is None and row["fps"] is None and row["model"] == "tiny-glm-image"
        images[item_id] = np.asarray(Image.open(io.BytesIO(location.read_bytes(row["path"]))))
        assert images[item_id].shape == (row["height"], row["width"], 3)
    assert images["t2i/wide"].shape == (32, 96, 3)
    assert json.loads(location.read_bytes(JOB_RECORD))["recorded"]["prior_batch"] == 2
    failures, _ = read_table(out, "failures")
    errors = {row["id"]: row["error"] for row in failures.to_pylist()}
    assert "corrupt.png cannot be decoded" in errors["i2i/corrupt"]
    assert "is 20x20: GLM-Image needs sides of at least 32 pixels" in errors["i2i/tiny"]

    # Alone (one worker, as a replica runs it, the prior unbatched), the row batched with t2i/plain
    # (its prior too) renders the same image.
    alone = render_in_process([rows[0]], "tiny-glm-image", tmp_path / "alone")
    assert np.abs(alone["t2i/sign"].astype(int) - images["t2i/sign"]).max() <= 1
