"""A row's decoded conditioning inputs, and the error that refuses one: shared by the worker,
which reads them (`cogdist.worker.inputs`), and the model families, which fit them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cogdist.errors import CogdistError

if TYPE_CHECKING:
    from PIL import Image


class InputError(CogdistError):
    """A row's conditioning input is missing, unreadable or unusable."""


@dataclass(frozen=True)
class Inputs:
    """A row's decoded conditioning inputs."""

    image: Image.Image | None = None
    video: list[Image.Image] | None = None
    """Exactly the row's num_frames frames, from the start of the video."""
