"""The worker: one per GPU (or CPU slot). Loads the pipeline once, renders units, writes outputs.

It makes no scheduling decisions: every setting of a row arrives resolved in its WorkItem, the
output name included. It returns only small metadata; the driver alone commits the index.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from cogdist.errors import StorageError
from cogdist.models.registry import ModelSpec
from cogdist.sink.encode import encode_image
from cogdist.storage import open_location
from cogdist.work import ItemResult, UnitResult, WorkUnit

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class WorkerSettings:
    format: str = "png"
    quality: int = 95
    dtype: str = "auto"
    """"auto": the model's GPU dtype on a GPU, its CPU dtype otherwise."""
    threads: int | None = None
    """torch intra-op threads on CPU; None leaves torch's default."""


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    pid: int
    node: str
    device: str
    dtype: str
    load_seconds: float


class RenderWorker:
    def __init__(
        self, spec: ModelSpec, out_uri: str, settings: WorkerSettings, rank: int = 0, world_size: int = 1
    ):
        self.spec = spec
        self.out_uri = out_uri
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.pipe = None

    def setup(self) -> WorkerInfo:
        """Load the pipeline (called once, after Ray has set the visible GPUs)."""
        import diffusers
        import torch
        import transformers

        from cogdist.models import family_module

        start = time.perf_counter()
        # Library warnings would repeat once per worker in the driver's log; errors still show.
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        name = self.settings.dtype
        if name == "auto":
            name = self.spec.dtype_gpu if self.device.type == "cuda" else self.spec.dtype_cpu
        self.family = family_module(self.spec.family)
        self.pipe = self.family.load_pipeline(self.spec, self.device, getattr(torch, name))
        self.out = open_location(self.out_uri)
        return WorkerInfo(
            rank=self.rank,
            pid=os.getpid(),
            node=os.uname().nodename,
            device=str(self.device),
            dtype=name,
            load_seconds=time.perf_counter() - start,
        )

    def render(self, unit: WorkUnit) -> UnitResult:
        start = time.perf_counter()
        images = self.family.render(self.pipe, unit.items, self.device)
        per_item = (time.perf_counter() - start) / len(unit.items)
        results = []
        for item, pixels in zip(unit.items, images):
            data = encode_image(pixels, self.settings.format, self.settings.quality)
            try:
                self.out.write_bytes(item.output, data)
            except StorageError as e:
                results.append(ItemResult(item.id, ok=False, error=str(e)))
                continue
            results.append(ItemResult(item.id, ok=True, bytes_written=len(data), render_seconds=per_item))
        return UnitResult(unit.unit_id, tuple(results), time.perf_counter() - start)
