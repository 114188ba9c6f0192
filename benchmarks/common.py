"""Helpers shared by the benchmarks: the machine's description, result files, and a worker's
pipeline built in this process.

The benchmarks are a package: run them from the project root as `python -m benchmarks.NAME`.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogdist.models.spec import FamilyRunner
    from cogdist.worker.worker import RenderWorker

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = 0.0
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def save(name: str, result: dict, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **result,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def timings(summary) -> dict:
    """The time figures of a cogdist RenderSummary, as the benchmarks record them."""
    steady = summary.steady_seconds
    return {
        "wall_seconds": round(summary.seconds, 2),
        "ray_start_seconds": round(summary.ray_start_seconds, 2),
        "startup_seconds": round(summary.startup_seconds, 2),
        "steady_seconds": round(steady, 2),
        "items_per_second": round(summary.done / steady, 3),
    }


def set_up_worker(model: str, out: str | None = None, **settings: Any) -> RenderWorker:
    """A RenderWorker for `model` (a preset, repo id or folder, as `--model` takes), set up in this
    process exactly as the one worker of a one-GPU replica is set up: its pipeline is `worker.pipe`
    on `worker.device`, its family `worker.family` (the FamilySpec) and `worker.runner` (the
    FamilyRunner); `worker.render(WorkUnit(...))` renders rows and writes them under `out`
    (default: a folder in the temp dir, which benchmarks that only use the pipeline never write).

    `settings`: WorkerSettings fields; VAE tiling, slicing and CPU offload default to the model's,
    as in `cogdist render`.
    """
    from cogdist.models.registry import resolve_model
    from cogdist.options import declared
    from cogdist.worker.settings import WorkerSettings
    from cogdist.worker.worker import RenderWorker

    spec = resolve_model(model)
    # Worker options whose None stands for the model's value (the memory options), as resolved.
    defaults = {
        name: getattr(spec, how.spec_field) for name, _, _, how in declared() if how.worker and how.spec_field
    }
    out = out or os.path.join(tempfile.gettempdir(), "cogdist-benchmark-out")
    worker = RenderWorker(spec, out, WorkerSettings(**{**defaults, **settings}))
    worker.setup()
    return worker


def family_runner(family: str) -> FamilyRunner:
    """The torch side of a model family, for a pipeline that no worker built (`worker.runner` is
    the same object): its `render(pipe, items, device, inputs)` returns the pixels that
    `worker.render` encodes and writes."""
    from cogdist.models.registry import family as family_spec

    return family_spec(family).load_runner()
