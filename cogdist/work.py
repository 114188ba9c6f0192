"""The plain data that crosses the boundary between the scheduler and the workers.

Only these small frozen records travel through Ray: the scheduler never sees a tensor and the
workers never see the manifest or the index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def derive_seed(item_id: str) -> int:
    """The seed of a row that names none: the first 8 bytes of sha256(id), as a 63-bit integer.

    Stable across processes, machines and Python versions (unlike `hash()`), so anyone can
    recompute it: `int.from_bytes(hashlib.sha256(id.encode()).digest()[:8], "big") >> 1`.
    """
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") >> 1


def sample_id(item_id: str, sample: int) -> str:
    """The id of sample `sample` of row `item_id` (--samples): the row's own for sample 0, else
    `<id>#<sample>` (validation refuses a manifest whose ids would collide with these)."""
    return item_id if sample == 0 else f"{item_id}#{sample}"


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of a row seeded `seed`: the row's own for sample 0, else the first
    8 bytes of sha256(f"{seed}#{sample}") as a 63-bit integer (as `derive_seed` does for ids)."""
    return seed if sample == 0 else derive_seed(f"{seed}#{sample}")


@dataclass(frozen=True)
class WorkItem:
    """One row to render, with every setting resolved (no defaults left to the worker)."""

    id: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    num_frames: int | None
    output: str
    """Where the worker writes the result, relative to OUT."""
    task: str = "text-to-image"
    """What the row asks of the model (cogdist.models.registry: TEXT_TO_IMAGE, ...)."""
    image: str | None = None
    """Conditioning image URI (local paths absolute, object-store endpoint explicit)."""
    video: str | None = None
    """Input or control video URI."""
    strength: float | None = None
    """Video-to-video: how far the input video is noised (0, 1]."""
    fps: float | None = None
    """Frames per second of a video output."""
    frames_dir: str | None = None
    """When set, the worker also writes every frame as a PNG under this folder (relative to OUT)."""
    adapters: tuple[tuple[str, float, str], ...] = ()
    """The LoRA adapters it renders with: (name, scale, sha256) of each (--lora, the `lora` column)."""
    sample_index: int = 0
    """Which of its manifest row's --samples it is (0: the row itself)."""
    source_id: str | None = None
    """Its manifest row's id, where it is a sample k > 0 (None: its own id)."""

    @property
    def shape(self) -> tuple:
        """Rows with equal shapes can share one pipeline call: same size, frames, task and schedule."""
        return (
            self.task,
            self.width,
            self.height,
            self.num_frames,
            self.num_inference_steps,
            self.guidance_scale,
            self.strength,
            self.adapters,  # workers switch adapters between units, not within one
        )


@dataclass(frozen=True)
class WorkUnit:
    """What one gang renders in one call: rows of one shape."""

    unit_id: int
    items: tuple[WorkItem, ...]
    turn: int | None = None
    """Its place in its replica's order, numbered by the driver as it submits: a worker renders
    its units in this order, so the ranks of a gang agree (None: a caller making one call at a time)."""


@dataclass(frozen=True)
class ItemResult:
    """Outcome of one row: written to OUT (ok) or an error message."""

    id: str
    ok: bool
    error: str | None = None
    bytes_written: int = 0
    sha256: str | None = None
    """Of the stored output's bytes, so anyone can check the object the index points at."""
    render_seconds: float = 0.0
    """Its share of the unit's rendering: the pipeline call, from prompt encoding to decoded pixels."""
    io_seconds: float = 0.0
    """Its own reading of inputs, encoding, hashing and storing, which overlap other rows' rendering."""
    compile_seconds: float = 0.0
    """Its share of the unit's torch.compile time (--compile: a shape bucket's first unit), not
    in render_seconds."""
    frames: int | None = None
    """Frames of a video output as rendered (CogVideoX 1.5 video-to-video may differ from the input)."""
    node: str | None = None
    """The Ray node whose worker rendered it."""
    data: bytes | None = None
    """The encoded output itself, when the driver stores it (--dataset webdataset/parquet)."""


@dataclass(frozen=True)
class UnitResult:
    unit_id: int
    items: tuple[ItemResult, ...]
    seconds: float
    """Wall time of the whole unit on the worker, from receipt to last write, less its wait for
    its turn (the render of a unit before it)."""
    step_seconds: tuple[float, ...] = ()
    """Time of each denoising step after the first, of each pipeline call (for metrics)."""

    @property
    def render_time(self) -> float:
        """How long the unit held its replica's renderer: its rows' pipeline and compile time,
        what the driver's prefetch estimate learns. Their storing runs behind the next render, so
        a slow store must not stop the driver queueing units. A unit whose rows never reached the
        pipeline (they failed before it) counts its wall time."""
        rendering = sum(item.render_seconds + item.compile_seconds for item in self.items)
        return rendering if rendering > 0 else self.seconds
