"""Reading a row's conditioning inputs: images through Pillow, videos through imageio-ffmpeg.

Inputs are read from their URI (local path, file://, s3://, gs://) with the job's own
credentials. Any failure is an InputError naming the URI, which fails that row alone; the
pipelines resize what they get the way each expects, so inputs are passed on at their own size.
"""

from __future__ import annotations

import io
import os
import re
import tempfile

import numpy as np
from PIL import Image

from cogdist.errors import StorageError
from cogdist.inputs import InputError, Inputs
from cogdist.storage import RETRY_SECONDS, read_uri, redact
from cogdist.work import WorkItem

__all__ = ["InputError", "Inputs", "load_image", "load_inputs", "load_video"]


def load_inputs(item: WorkItem, retry_seconds: float = RETRY_SECONDS) -> Inputs:
    image = load_image(item.image, retry_seconds) if item.image else None
    video = load_video(item.video, item.num_frames or 0, retry_seconds) if item.video else None
    return Inputs(image=image, video=video)


def load_image(uri: str, retry_seconds: float = RETRY_SECONDS) -> Image.Image:
    data = _read(uri, "image", retry_seconds)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # Pillow raises many types for a corrupt file
        raise InputError(f"image {redact(uri)} cannot be decoded: {type(e).__name__}: {e}") from e


def load_video(uri: str, frames: int, retry_seconds: float = RETRY_SECONDS) -> list[Image.Image]:
    """The first `frames` frames of the video at `uri`, as RGB images."""
    import imageio_ffmpeg

    data = _read(uri, "video", retry_seconds)
    with tempfile.TemporaryDirectory(prefix="cogdist-input-") as folder:
        path = os.path.join(folder, "input")
        with open(path, "wb") as f:
            f.write(data)
        decoded: list[Image.Image] = []
        try:
            reader = imageio_ffmpeg.read_frames(path)
            meta = next(reader)
            width, height = meta["size"]
            for raw in reader:
                if len(decoded) == frames:
                    break
                pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
                decoded.append(Image.fromarray(pixels.copy()))
            reader.close()
        except Exception as e:  # ffmpeg reports a corrupt or non-video file as a RuntimeError/OSError
            raise InputError(f"video {redact(uri)} cannot be decoded: {_first_line(e)}") from e
    if len(decoded) < frames:
        raise InputError(f"video {redact(uri)} has {len(decoded)} frames; this row needs {frames}")
    return decoded


def _read(uri: str, what: str, retry_seconds: float) -> bytes:
    try:
        return read_uri(uri, retry_seconds)
    except StorageError as e:
        raise InputError(f"{what} cannot be read: {e}") from e


def _first_line(error: BaseException) -> str:
    """ffmpeg's errors carry its whole banner; keep the headline and its complaints."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    complaints = [
        line for line in lines[1:] if re.search(r"invalid|error|not contain|no such|moov", line, re.I)
    ]
    return f"{type(error).__name__}: {'; '.join(lines[:1] + complaints[:2])}"[:500]
