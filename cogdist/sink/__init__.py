"""Outputs and their bookkeeping: names, encoding, the index and failure records, the job record.

`SINKS` maps each --dataset value to the Sink that stores its outputs; a new output form is one
Sink subclass and one entry here.
"""

from cogdist.errors import UsageError
from cogdist.sink.base import Sink
from cogdist.sink.dataset import FILES, PARQUET, WEBDATASET
from cogdist.sink.files import FileSink
from cogdist.sink.shards import ShardSink

SINKS: dict[str, type[Sink]] = {FILES: FileSink, WEBDATASET: ShardSink, PARQUET: ShardSink}

__all__ = ["SINKS", "FileSink", "ShardSink", "Sink", "check_dataset"]


def check_dataset(dataset: str, shard_size: int, save_frames: bool) -> None:
    """Refuse an unknown --dataset, a shard of no samples, and frame files beside shards."""
    if dataset not in SINKS:
        raise UsageError(f"--dataset {dataset!r}: choose one of {', '.join(SINKS)}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    if dataset != FILES and save_frames:
        raise UsageError(f"--save-frames writes files beside each video; not with --dataset {dataset}")
