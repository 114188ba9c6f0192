"""Encoding rendered images and videos to bytes, whole, before anything is written."""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cogdist.errors import UsageError

if TYPE_CHECKING:
    from cogdist.models.spec import ModelSpec
    from cogdist.work import WorkItem

# --format value -> (file extension, Pillow format name)
IMAGE_FORMATS = {"png": ("png", "PNG"), "jpeg": ("jpg", "JPEG"), "webp": ("webp", "WEBP")}
VIDEO_FORMATS = {"mp4": ("mp4", "libx264")}
DEFAULT_QUALITY = {"png": 95, "jpeg": 95, "webp": 95, "mp4": 65}  # mp4: 65 -> CRF 18


def check_output_format(spec: ModelSpec, fmt: str | None, quality: int | None) -> None:
    """Refuse --format a model does not make, and --quality outside 1..100."""
    formats = VIDEO_FORMATS if spec.kind == "video" else IMAGE_FORMATS
    if fmt is not None and fmt not in formats:
        raise UsageError(f"--format {fmt!r}: {spec.name} makes {spec.kind}s; choose {', '.join(formats)}")
    if quality is not None and not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {quality}")


def extension(fmt: str) -> str:
    return {**IMAGE_FORMATS, **VIDEO_FORMATS}[fmt][0]


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """`pixels`: uint8 array of shape (height, width, 3)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 6}
    Image.fromarray(pixels).save(buffer, format=IMAGE_FORMATS[fmt][1], **options)
    return buffer.getvalue()


def crf(quality: int) -> int:
    """--quality 1..100 as an H.264 constant rate factor (51 worst .. 0 lossless)."""
    return round(51 * (1 - quality / 100))


def encode_video(frames: np.ndarray, fps: float, quality: int = DEFAULT_QUALITY["mp4"]) -> bytes:
    """`frames`: uint8 array (frames, height, width, 3) -> MP4 bytes (H.264, yuv420p).

    ffmpeg must seek back to write the MP4 index, so it writes a temporary file; its bytes are
    returned whole, so the caller uploads a complete video or nothing.
    """
    import imageio_ffmpeg

    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    with tempfile.TemporaryDirectory(prefix="cogdist-video-") as folder:
        path = os.path.join(folder, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # the CRF below instead of imageio's scale
            macro_block_size=1,  # sizes are validated multiples of 16; never rescale
            output_params=["-crf", str(crf(quality)), "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as f:
            return f.read()


@dataclass(frozen=True)
class Encoded:
    """A row's output encoded in memory, ready to store: its frames' PNGs (--save-frames) and
    the indexed file."""

    frames: list[tuple[str, bytes]]
    data: bytes
    frame_count: int | None
    seconds: float

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(len(png) for _, png in self.frames)


def encode_output(item: WorkItem, pixels: np.ndarray, fmt: str, quality: int) -> Encoded:
    """A row's pixels encoded in memory (its frames' PNGs first when it saves frames, then the
    indexed file): an image in `fmt`, frames (4 dimensions) as MP4 at the row's fps."""
    start = time.perf_counter()
    frames: list[tuple[str, bytes]] = []
    if pixels.ndim == 4:
        if item.frames_dir:
            frames = [
                (f"{item.frames_dir}/{number:06d}.png", encode_image(frame, "png"))
                for number, frame in enumerate(pixels)
            ]
        data = encode_video(pixels, item.fps or 8.0, quality)
    else:
        data = encode_image(pixels, fmt, quality)
    frame_count = pixels.shape[0] if pixels.ndim == 4 else None
    return Encoded(frames, data, frame_count, time.perf_counter() - start)
