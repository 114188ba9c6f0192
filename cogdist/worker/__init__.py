"""Workers: the processes that hold a pipeline and render units."""

from cogdist.worker.worker import RenderWorker, WorkerInfo, WorkerSettings

__all__ = ["RenderWorker", "WorkerInfo", "WorkerSettings"]
