"""Tasks, frames, sizes and inputs of every family are checked before rendering, per row."""

from __future__ import annotations

import math
import os

import pytest

import cogdist
from cogdist.errors import ManifestError, UsageError
from cogdist.manifest import ManifestSource
from cogdist.manifest.rows import RowDefaults, work_items
from cogdist.models.registry import PRESETS
from tests.conftest import cli, write_manifest

# (model, rows, expected fragments of the message) -- each refused with the row named.
CASES = {
    "image on a text-to-video model": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p", "image": "cat.png"}],
        ["row 1", "id 'b'", "column 'image'", "takes no 'image' input", "text-to-video (prompt only)"],
    ),
    "image-to-video row without an image": (
        "tiny-cogvideox-i2v",
        [{"id": "a", "prompt": "p", "image": "cat.png"}, {"id": "b", "prompt": "p", "image": None}],
        ["row 1", "id 'b'", "column 'image'", "needs 'image' on every row"],
    ),
    "image-to-video manifest without an image column": (
        "tiny-cogvideox-i2v",
        [{"id": "a", "prompt": "p"}],
        ["row 0", "column 'prompt'", "needs 'image' on every row"],
    ),
    "control model without a control video": (
        "tiny-cogvideox-fun",
        [{"id": "a", "prompt": "p", "video": None}],
        ["row 0", "column 'video'", "needs 'video' on every row", "control-to-video"],
    ),
    "video on an image-to-video model": (
        "tiny-cogvideox-i2v",
        [{"id": "a", "prompt": "p", "image": "a.png", "video": "a.mp4"}],
        ["row 0", "column 'video'", "takes no 'video' input"],
    ),
    "video on an image model": (
        "tiny-glm-image",
        [{"id": "a", "prompt": "p", "video": "a.mp4"}],
        ["column 'video'", "takes no 'video' input"],
    ),
    "empty image string": (
        "tiny-glm-image",
        [{"id": "a", "prompt": "p", "image": ""}],
        ["row 0", "column 'image'", "is empty; leave it null"],
    ),
    "frames not 4k+1": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "num_frames": 9}, {"id": "b", "prompt": "p", "num_frames": 10}],
        ["row 1", "column 'num_frames'", "= 10", "10 frames is not 4k+1", "8k+1 in 1..33"],
    ),
    "frames that the VAE would decode to another count": (
        "tiny-cogvideox",
        [
            {"id": "a", "prompt": "p", "num_frames": 5},
            {"id": "b", "prompt": "p", "video": "v.mp4", "num_frames": 13},
        ],
        ["row 0", "5 frames make 2 latent frames, which the VAE decodes to 8; use 8k+1 frames", "row 1"],
    ),
    "frames too many": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "num_frames": 37}],
        ["row 0", "37 frames is outside 1..33"],
    ),
    "CogVideoX 1.0 takes 49 frames": (
        "THUDM/CogVideoX-5b",
        [{"id": "a", "prompt": "p", "num_frames": 25}],
        ["row 0", "column 'num_frames'", "25 frames is not one of 49"],
    ),
    "CogVideoX 1.0 takes 720x480": (
        "THUDM/CogVideoX-2b",
        [{"id": "a", "prompt": "p", "width": 1360, "height": 768}],
        ["row 0", "column 'width'", "1360x768 is not a size this model takes", "takes 720x480"],
    ),
    "CogVideoX 1.5 takes 81 or 161": (
        "THUDM/CogVideoX1.5-5B",
        [{"id": "a", "prompt": "p", "num_frames": 49}],
        ["49 frames is not one of 81, 161"],
    ),
    "CogVideoX 1.5 I2V shorter side": (
        "THUDM/CogVideoX1.5-5B-I2V",
        [{"id": "a", "prompt": "p", "image": "a.png", "width": 1024, "height": 1024}],
        ["row 0", "column 'height'", "the shorter side is 1024, not 768"],
    ),
    "1.5 video input must make whole temporal patches": (
        "tiny-cogvideox1.5",
        [{"id": "a", "prompt": "p", "video": "a.mp4", "num_frames": 9}],
        ["row 0", "column 'num_frames'", "9 frames make 3 latent frames, not a multiple of 2"],
    ),
    "size not a multiple of 16": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "width": 72}],
        ["row 0", "column 'width'", "= 72", "not a multiple of 16"],
    ),
    "strength out of range": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "video": "a.mp4", "strength": 1.5}],
        ["row 0", "column 'strength'", "= 1.5", "must be in (0, 1]"],
    ),
    "nan strength": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "video": "a.mp4", "strength": math.nan}],
        ["column 'strength'", "must be in (0, 1]"],
    ),
    "strength without a video": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "strength": 0.5}],
        ["row 0", "column 'strength'", "video-to-video rows only"],
    ),
    "strength on a model without video-to-video": (
        "tiny-cogvideox-i2v",
        [{"id": "a", "prompt": "p", "image": "a.png", "strength": 0.5}],
        ["column 'strength'", "takes no 'strength' input"],
    ),
    "fps not positive": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "fps": 0.0}],
        ["row 0", "column 'fps'", "must be > 0"],
    ),
    "fps on an image model": (
        "tiny-glm-image",
        [{"id": "a", "prompt": "p", "fps": 8.0}],
        ["column 'fps'", "makes images"],
    ),
    "negative prompt on GLM-Image": (
        "tiny-glm-image",
        [
            {"id": "a", "prompt": "p", "negative_prompt": ""},
            {"id": "b", "prompt": "p", "negative_prompt": "blurry"},
        ],
        ["row 1", "id 'b'", "column 'negative_prompt'", "takes no negative prompt"],
    ),
    "GLM-Image size not a multiple of 32": (
        "tiny-glm-image",
        [{"id": "a", "prompt": "p", "width": 48}],
        ["row 0", "column 'width'", "not a multiple of 32"],
    ),
    "reserved task column": (
        "tiny-cogvideox",
        [{"id": "a", "prompt": "p", "task": "t2v"}],
        ["column 'task'", "cogdist writes into the index"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_rows_are_refused_with_row_column_and_reason(tmp_path, case):
    model, data, expected = CASES[case]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    with pytest.raises(ManifestError) as refused:
        cogdist.validate(str(manifest), model=model)
    message = str(refused.value)
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"


def test_mixed_tasks_sizes_and_frames_of_one_model_are_accepted(tmp_path):
    data = [
        {"id": "t2v", "prompt": "p", "video": None, "strength": None, "num_frames": 9},
        {"id": "t2v-big", "prompt": "p", "video": None, "width": 96, "height": 64, "num_frames": 17},
        {"id": "one-frame", "prompt": "p", "num_frames": 1},
        {"id": "v2v", "prompt": "p", "video": "clip.mp4", "strength": 0.6},
        {"id": "v2v-default", "prompt": "p", "video": "s3://bucket/clip.mp4", "fps": 12.0},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", data)
    report = cogdist.validate(str(manifest), model="tiny-cogvideox")
    assert report.rows == 5

    source = ManifestSource(str(manifest))
    spec = PRESETS["tiny-cogvideox"]
    items = {
        item.id: item
        for part in source.batches()
        for item, _ in work_items(part.batch, spec, RowDefaults("mp4", save_frames=True))
    }
    assert items["t2v"].task == "text-to-video" and items["t2v"].strength is None
    assert items["t2v-big"].num_frames == 17 and (items["t2v-big"].width, items["t2v-big"].height) == (96, 64)
    assert items["v2v"].task == "video-to-video" and items["v2v"].strength == 0.6
    assert os.path.isabs(items["v2v"].video) and items["v2v"].video.endswith("/clip.mp4")  # for any worker
    assert items["v2v-default"].video.startswith("s3://bucket/clip.mp4")
    assert items["v2v-default"].strength == 0.8 and items["v2v-default"].fps == 12.0  # diffusers' default
    assert items["t2v"].fps == 8.0 and items["t2v"].num_frames == 9
    assert items["t2v"].output.endswith(".mp4") and items["t2v"].frames_dir.endswith(".frames")
    assert len({item.shape for item in items.values()}) == 5  # each its own bucket


def test_options_that_do_not_fit_the_model(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    with pytest.raises(UsageError, match="--format 'png': tiny-cogvideox makes videos; choose mp4"):
        cogdist.validate(str(manifest), model="tiny-cogvideox", format="png")
    with pytest.raises(UsageError, match="--format 'mp4': tiny-cogview4 makes images"):
        cogdist.validate(str(manifest), model="tiny-cogview4", format="mp4")
    with pytest.raises(UsageError, match="--frames: 13 frames make 4 latent frames"):
        cogdist.validate(str(manifest), model="tiny-cogvideox", frames=13)
    with pytest.raises(UsageError, match="--save-frames: tiny-cogview4 makes images"):
        cogdist.validate(str(manifest), model="tiny-cogview4", save_frames=True)
    with pytest.raises(UsageError, match="--fps must be > 0"):
        cogdist.validate(str(manifest), model="tiny-cogvideox", fps=-1.0)


def test_the_cli_refuses_a_video_manifest_before_writing(tmp_path):
    manifest = write_manifest(
        tmp_path / "bad.parquet", [{"id": "ok", "prompt": "p"}, {"id": "x", "prompt": "p", "num_frames": 8}]
    )
    out = tmp_path / "out"
    result = cli("render", str(manifest), "--model", "tiny-cogvideox", "--out", str(out), timeout=120)
    assert result.returncode == 2
    assert "row 1, id 'x', column 'num_frames' = 8: 8 frames is not 4k+1" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
