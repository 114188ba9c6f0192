"""Driver-side policy: what to render next, in which units, and what to do when it fails."""

from cogdist.scheduler.scheduler import Failed, Finished, Row, Scheduler

__all__ = ["Failed", "Finished", "Row", "Scheduler"]
