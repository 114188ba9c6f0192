"""cogdist: render large batches of CogView4 / CogVideoX / GLM-Image outputs across GPUs with Ray."""

__version__ = "0.1.0"

from cogdist.api import JobStatus, models, render, report, status, validate  # noqa: E402
from cogdist.engine import RenderSummary  # noqa: E402
from cogdist.options import RenderOptions  # noqa: E402

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
