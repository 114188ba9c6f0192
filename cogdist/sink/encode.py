"""Encoding rendered images to bytes, whole, before anything is written."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# --format value -> (file extension, Pillow format name)
IMAGE_FORMATS = {"png": ("png", "PNG"), "jpeg": ("jpg", "JPEG"), "webp": ("webp", "WEBP")}


def extension(fmt: str) -> str:
    return IMAGE_FORMATS[fmt][0]


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """`pixels`: uint8 array of shape (height, width, 3)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"compress_level": 6}
    Image.fromarray(pixels).save(buffer, format=IMAGE_FORMATS[fmt][1], **options)
    return buffer.getvalue()
