"""The contact sheet: thumbnails of sampled outputs, animated previews of videos."""

from __future__ import annotations

import base64
import io
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from cogdist.errors import StorageError
from cogdist.sink.dataset import read_sample
from cogdist.sink.journal import done_schema, read_done
from cogdist.storage import Location

THUMBNAIL_PIXELS = 160
PREVIEW_FRAMES = 8
VIDEO_EXTENSIONS = (".mp4",)


@dataclass(frozen=True)
class Thumbnail:
    id: str
    prompt: str
    still: Image.Image | None
    """What the PNG shows (a video's middle frame); None when the output cannot be shown."""
    data_uri: str
    """What the page shows: the still, or an animated WebP of a few of a video's frames."""
    note: str = ""
    """Why there is no picture, or what it is."""


def read_thumbnails(location: Location, ids: list[str]) -> list[Thumbnail]:
    if not ids:
        return []
    schema = done_schema(location)
    wanted = ["id", "prompt", "path", "fps", "format", "sample_key"]
    table = read_done(location, [c for c in wanted if c in schema.names], filter=ds.field("id").isin(ids))
    rows = sorted(table.to_pylist(), key=lambda row: row["id"])
    shards: dict[str, bytes] = {}  # --dataset: several samples may share a shard
    return [_thumbnail(location, row, shards) for row in rows]


def _thumbnail(location: Location, row: dict, shards: dict[str, bytes]) -> Thumbnail:
    item_id, prompt, path = row["id"], str(row.get("prompt") or ""), row.get("path") or ""
    try:
        data = read_sample(location, row, shards)
        if path.lower().endswith(VIDEO_EXTENSIONS) or row.get("format") == "mp4":
            frames, fps = _video_frames(data)
            return _video_thumbnail(item_id, prompt, frames, row.get("fps") or fps)
        still = _fit(Image.open(io.BytesIO(data)).convert("RGB"))
    except StorageError as e:
        return Thumbnail(item_id, prompt, None, "", f"output unreadable: {e}")
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
    ) as e:  # what Pillow and imageio-ffmpeg raise on bad data
        return Thumbnail(item_id, prompt, None, "", f"output cannot be decoded: {e}")
    return Thumbnail(item_id, prompt, still, data_uri(encode(still, "PNG"), "image/png"))


def _video_frames(data: bytes) -> tuple[list[Image.Image], float]:
    """Every frame of an MP4, each already shrunk to a thumbnail, and its frame rate."""
    import imageio_ffmpeg

    # ffmpeg reads a file: an output on an object store goes through a temporary one.
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        file.write(data)
        file.flush()
        reader = imageio_ffmpeg.read_frames(file.name)
        try:
            meta = next(reader)
            width, height = meta["size"]
            frames = [
                _fit(Image.fromarray(np.frombuffer(raw, np.uint8).reshape(height, width, 3)))
                for raw in reader
            ]
        finally:
            reader.close()
    if not frames:
        raise ValueError("the video has no frames")
    return frames, float(meta.get("fps") or 8.0)


def _video_thumbnail(item_id: str, prompt: str, frames: list[Image.Image], fps: float) -> Thumbnail:
    count = min(PREVIEW_FRAMES, len(frames))
    chosen = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, count).round()]
    # The preview lasts as long as the video: fewer frames, each shown longer.
    milliseconds = round(1000 * len(frames) / fps / count)
    buffer = io.BytesIO()
    chosen[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=chosen[1:],
        duration=milliseconds,
        loop=0,
        quality=80,
    )
    still = frames[len(frames) // 2]
    return Thumbnail(
        item_id, prompt, still, data_uri(buffer.getvalue(), "image/webp"), f"{len(frames)} frames"
    )


def _fit(image: Image.Image) -> Image.Image:
    """The image scaled to fit a THUMBNAIL_PIXELS square: small outputs enlarged to be seen."""
    scale = THUMBNAIL_PIXELS / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
