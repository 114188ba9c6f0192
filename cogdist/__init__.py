"""cogdist: render large batches of CogView4 / CogVideoX / GLM-Image outputs across GPUs with Ray.

The public API is imported on first use, not with the package: the worker side
(`cogdist.models`, `cogdist.parallel`, `cogdist.worker`, `cogdist.sink.encode`) imports and runs
without Ray, as on a GPU machine that has torch but no Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cogdist._version import __version__

if TYPE_CHECKING:
    from cogdist.api import JobStatus, models, render, report, status, validate
    from cogdist.engine import RenderSummary
    from cogdist.options import RenderOptions

_PUBLIC = {
    "JobStatus": "cogdist.api",
    "models": "cogdist.api",
    "render": "cogdist.api",
    "report": "cogdist.api",
    "status": "cogdist.api",
    "validate": "cogdist.api",
    "RenderSummary": "cogdist.engine",
    "RenderOptions": "cogdist.options",
}

__all__ = [
    "JobStatus",
    "RenderOptions",
    "RenderSummary",
    "__version__",
    "models",
    "render",
    "report",
    "status",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cogdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
