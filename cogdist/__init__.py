"""cogdist: render large batches of CogView4 / CogVideoX / GLM-Image outputs across GPUs with Ray."""

from cogdist._version import __version__
from cogdist.api import JobStatus, models, render, report, status, validate
from cogdist.engine import RenderSummary
from cogdist.options import RenderOptions

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
