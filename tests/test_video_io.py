"""MP4 outputs and conditioning inputs: real files through imageio-ffmpeg and Pillow, read back."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cogdist.sink.encode import crf, encode_video
from cogdist.storage import input_uri
from cogdist.work import WorkItem
from cogdist.worker.inputs import InputError, load_image, load_inputs, load_video
from tests.conftest import probe_mp4


def gradient_video(frames: int, width: int, height: int) -> np.ndarray:
    """Smooth frames (H.264 keeps them within a few levels), each a little brighter."""
    x = np.linspace(0, 200, width)[None, :, None]
    y = np.linspace(0, 50, height)[:, None, None]
    return np.stack([np.broadcast_to(x + y + 4 * i, (height, width, 3)) for i in range(frames)]).astype(
        np.uint8
    )


def test_encoded_mp4_is_h264_yuv420p_with_every_frame_at_the_fps(tmp_path):
    video = gradient_video(9, 96, 64)
    path = tmp_path / "v.mp4"
    path.write_bytes(encode_video(video, fps=8.0))
    meta, frames = probe_mp4(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 8.0 and meta["size"] == (96, 64)
    assert len(frames) == 9
    for original, decoded in zip(video, frames):
        assert np.abs(original.astype(int) - decoded).mean() < 2  # lossy, but close


def test_quality_maps_to_crf_and_changes_the_size(tmp_path):
    assert (crf(100), crf(65), crf(1)) == (0, 18, 50)
    video = (np.random.RandomState(0).rand(5, 64, 64, 3) * 255).astype(np.uint8)
    assert len(encode_video(video, 16.0, quality=20)) < len(encode_video(video, 16.0, quality=90))


def test_odd_sizes_are_refused_before_ffmpeg_runs():
    with pytest.raises(ValueError, match="even sizes"):
        encode_video(np.zeros((2, 63, 64, 3), np.uint8), 8.0)


def test_video_input_gives_the_first_frames_and_refuses_a_short_video(tmp_path):
    path = tmp_path / "in.mp4"
    path.write_bytes(encode_video(gradient_video(13, 64, 48), fps=8.0))
    frames = load_video(str(path), 9)
    assert len(frames) == 9 and frames[0].size == (64, 48) and frames[0].mode == "RGB"
    assert np.asarray(frames[8]).mean() > np.asarray(frames[0]).mean()  # in order
    with pytest.raises(InputError, match=r"has 13 frames; this row needs 17"):
        load_video(str(path), 17)


def test_corrupt_and_missing_inputs_name_the_uri(tmp_path):
    good = tmp_path / "good.mp4"
    good.write_bytes(encode_video(gradient_video(5, 32, 32), fps=8.0))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match=rf"video {truncated} cannot be decoded"):
        load_video(str(truncated), 5)
    with pytest.raises(InputError, match=r"video cannot be read: .*nothing.mp4 does not exist"):
        load_video(str(tmp_path / "nothing.mp4"), 5)

    broken = tmp_path / "broken.png"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    broken.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(InputError, match=rf"image {broken} cannot be decoded"):
        load_image(str(broken))
    with pytest.raises(InputError, match=r"image cannot be read: .*nothing.png does not exist"):
        load_image(str(tmp_path / "nothing.png"))
    with pytest.raises(InputError, match="is not a file"):
        load_image(str(tmp_path))


def test_inputs_load_from_s3_with_the_jobs_credentials(s3_server, s3_bucket):
    import boto3

    buffer = io.BytesIO()
    Image.new("RGBA", (40, 24), (10, 20, 30, 128)).save(buffer, format="WEBP")
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=s3_bucket, Key="cond/a.webp", Body=buffer.getvalue())
    uri = input_uri(f"s3://{s3_bucket}/cond/a.webp")
    assert "endpoint_override=" in uri  # workers need not have the endpoint in their environment
    item = WorkItem("a", "p", None, 1, 64, 64, 4, 6.0, 9, "o.mp4", task="image-to-video", image=uri)
    loaded = load_inputs(item).image
    assert loaded.mode == "RGB" and loaded.size == (40, 24)
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/cond/missing.png does not exist"):
        load_image(input_uri(f"s3://{s3_bucket}/cond/missing.png"))


def test_relative_local_inputs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert input_uri("cond/a.png") == str(tmp_path / "cond" / "a.png")
    assert input_uri("file:///data/a.png") == "file:///data/a.png"
