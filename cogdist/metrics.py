"""A render's Ray metrics (`ray.util.metrics`), so the Ray dashboard and Prometheus show a running job.

Each node's metrics agent exports them as `ray_cogdist_*` (counters end in `_total`), tagged
with the job's OUT and model so that jobs sharing a cluster stay apart. The driver records
them all: the workers return their step timings with each unit, so a metric never disappears
with a worker that was killed or rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence

from cogdist.patching import replaced

# Seconds: quick CPU test models up to long videos on real checkpoints.
ITEM_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]
STEP_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]
TAG_KEYS = ("out", "model")


class RenderMetrics:
    def __init__(self, out: str, model: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"out": out, "model": model}
        self.done = Counter(
            "cogdist_items_done", description="Rows rendered and indexed.", tag_keys=TAG_KEYS
        ).set_default_tags(tags)
        self.failed = Counter(
            "cogdist_items_failed", description="Rows recorded as failed for good.", tag_keys=TAG_KEYS
        ).set_default_tags(tags)
        self.item_seconds = Histogram(
            "cogdist_item_seconds",
            description="A worker's seconds per row: inputs, rendering, encoding and upload.",
            boundaries=ITEM_BOUNDARIES,
            tag_keys=TAG_KEYS,
        ).set_default_tags(tags)
        self.step_seconds = Histogram(
            "cogdist_step_seconds",
            description="Seconds per denoising step of a pipeline call (a batch of rows).",
            boundaries=STEP_BOUNDARIES,
            tag_keys=TAG_KEYS,
        ).set_default_tags(tags)
        self.queue_depth = Gauge(
            "cogdist_queue_depth",
            description="Rows of this run not yet finished or failed.",
            tag_keys=TAG_KEYS,
        ).set_default_tags(tags)
        self.replicas_ready = Gauge(
            "cogdist_replicas_ready", description="Replicas rendering.", tag_keys=TAG_KEYS
        ).set_default_tags(tags)

    def rows(self, item_seconds: Sequence[float], failed: int, queue_depth: int) -> None:
        """Rows finished (each worker's seconds for it) and failed; rows of the run still to do."""
        if item_seconds:
            self.done.inc(len(item_seconds))
        for seconds in item_seconds:
            self.item_seconds.observe(seconds)
        if failed:
            self.failed.inc(failed)
        self.queue_depth.set(queue_depth)

    def steps(self, step_seconds: Sequence[float]) -> None:
        for seconds in step_seconds:
            self.step_seconds.observe(seconds)


@contextlib.contextmanager
def timing_steps(scheduler, seconds: list[float]) -> Iterator[None]:
    """Append to `seconds` the time between successive `scheduler.step` calls made in the block:
    one denoising step each (the transformer's passes and the step itself)."""
    real_step = scheduler.step
    last: float | None = None

    @functools.wraps(real_step)  # the pipeline inspects its signature for eta/generator
    def step(*args, **kwargs):
        nonlocal last
        outputs = real_step(*args, **kwargs)
        now = time.perf_counter()
        if last is not None:
            seconds.append(now - last)
        last = now
        return outputs

    with replaced(scheduler, "step", step):
        yield
