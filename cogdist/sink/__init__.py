"""Outputs and their bookkeeping: names, encoding, the index and failure records, the job record.

`SINKS` maps each --dataset value to the Sink that stores its outputs; a new output form is one
Sink subclass and one entry here.
"""

from cogdist.sink.base import Sink
from cogdist.sink.dataset import FILES, PARQUET, WEBDATASET
from cogdist.sink.files import FileSink
from cogdist.sink.shards import ShardSink

SINKS: dict[str, type[Sink]] = {FILES: FileSink, WEBDATASET: ShardSink, PARQUET: ShardSink}

__all__ = ["SINKS", "FileSink", "ShardSink", "Sink"]
