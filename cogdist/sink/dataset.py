"""Dataset shards: `--dataset webdataset` (tar) or `--dataset parquet` (Hugging Face datasets).

In a dataset mode the workers return each encoded output instead of storing it as a file; the
driver buffers finished samples, writes `shard_size` of them as one shard, and only then commits
their index rows, which name the shard (`path`) and the sample in it (`sample_key`). A shard is
written whole under the next unused number; one that a killed run wrote but never indexed is
deleted when the job resumes (its rows are pending again), so every id is in exactly one shard.
A kill loses the samples still buffered (fewer than `shard_size`): they are rendered again.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

from cogdist.sink.ledger import INDEX, read_table
from cogdist.sink.naming import sample_key
from cogdist.storage import Location

FILES = "files"
WEBDATASET = "webdataset"
PARQUET = "parquet"
DEFAULT_SHARD_SIZE = 256
SHARD_FOLDERS = {WEBDATASET: "shards", PARQUET: "data"}
_NAMES = {WEBDATASET: "shard-{:06d}.tar", PARQUET: "train-{:06d}.parquet"}
_NUMBER = re.compile(r"-(\d{6})\.(?:tar|parquet)$")
_VIDEO_EXTENSIONS = ("mp4",)


@dataclass
class Sample:
    row: dict
    """The sample's index row (manifest columns and results)."""
    data: bytes
    """The encoded output (PNG, JPEG, WebP or MP4)."""
    extension: str


class ShardWriter:
    """Buffers finished samples; `flush` stores them as one shard and returns their index rows."""

    def __init__(self, location: Location, kind: str, shard_size: int, first_number: int, schema: pa.Schema):
        self.location = location
        self.kind = kind
        self.schema = schema
        """The index rows' schema: every Parquet shard gets the same one, as `datasets` requires."""
        self.shard_size = shard_size
        self.number = first_number
        self.samples: list[Sample] = []

    @property
    def pending(self) -> int:
        return len(self.samples)

    @property
    def full(self) -> bool:
        return len(self.samples) >= self.shard_size

    def add(self, row: dict, data: bytes, extension: str) -> None:
        self.samples.append(Sample(row, data, extension))

    def flush(self) -> list[dict]:
        """Write the buffered samples as the next shard; on failure they stay buffered."""
        if not self.samples:
            return []
        path = f"{SHARD_FOLDERS[self.kind]}/{_NAMES[self.kind].format(self.number)}"
        for sample in self.samples:
            sample.row.update(
                path=path, uri=self.location.uri_of(path), sample_key=sample_key(sample.row["id"])
            )
        if self.kind == WEBDATASET:
            data = tar_shard(self.samples)
        else:
            data = parquet_shard(self.samples, self.schema)
        self.location.write_bytes(path, data, durable=True)
        rows = [sample.row for sample in self.samples]
        self.samples = []
        self.number += 1
        return rows


def prepare_shards(location: Location, kind: str) -> int:
    """Delete shards no index row names (a killed run's last one); the next free shard number."""
    folder = SHARD_FOLDERS[kind]
    location.sweep_temporary(folder)
    table = read_table(location, INDEX, columns=["path"])
    indexed = set(table.column("path").unique().to_pylist()) if table is not None else set()
    numbers = [-1]
    for info in location.list_files(folder):
        rel = f"{folder}/{info.base_name}"
        match = _NUMBER.search(info.base_name)
        if rel in indexed and match:
            numbers.append(int(match.group(1)))
        else:
            location.delete(rel)
    return max(numbers) + 1


# -- WebDataset ------------------------------------------------------------------------------


def tar_shard(samples: list[Sample]) -> bytes:
    """A WebDataset shard: per sample `<key>.<ext>` (the output), `<key>.json` (its index row) and
    `<key>.txt` (the prompt), consecutive in the tar, as WebDataset readers group them."""
    buffer = io.BytesIO()
    mtime = int(time.time())  # whole seconds: a float would add a PAX header to every member
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample.row["sample_key"]
            metadata = json.dumps(_jsonable(sample.row), ensure_ascii=False).encode()
            caption = (sample.row.get("prompt") or "").encode()
            for name, data in (
                (f"{key}.{sample.extension}", sample.data),
                (f"{key}.json", metadata),
                (f"{key}.txt", caption),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _jsonable(row: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


# -- Parquet for Hugging Face datasets ------------------------------------------------------


def media_column(extension: str) -> str:
    return "video" if extension in _VIDEO_EXTENSIONS else "image"


def parquet_shard(samples: list[Sample], index_schema: pa.Schema) -> bytes:
    """A Parquet file `datasets.load_dataset("parquet", ...)` decodes: the index row's columns
    plus the output as an `image` or `video` column (struct of bytes and path, with the feature
    named in the schema's `huggingface` metadata). A manifest input column of that name (image-
    or video-to-video) is kept as `input_image` / `input_video`."""
    media = media_column(samples[0].extension)
    rows = []
    for sample in samples:
        row = {(f"input_{k}" if k == media else k): v for k, v in sample.row.items()}
        row[media] = {"bytes": sample.data, "path": f"{sample.row['sample_key']}.{sample.extension}"}
        rows.append(row)
    fields = [field.with_name(f"input_{media}") if field.name == media else field for field in index_schema]
    media_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    table = pa.Table.from_pylist(rows, schema=pa.schema([*fields, pa.field(media, media_type)]))
    features = {media: {"_type": "Video" if media == "video" else "Image"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_sample(location: Location, row: dict, shards: dict[str, bytes] | None = None) -> bytes:
    """The encoded output of an index row (`path`, `format`, `sample_key`), whether stored as a file
    or inside a shard; `shards` keeps the shards read, for callers reading many samples."""
    key = row.get("sample_key")
    if not key:
        return location.read_bytes(row["path"])
    shards = {} if shards is None else shards
    if row["path"] not in shards:
        shards[row["path"]] = location.read_bytes(row["path"])
    data = shards[row["path"]]
    if row["path"].endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                stem, _, extension = member.name.partition(".")
                if stem == key and extension not in ("json", "txt"):
                    return tar.extractfile(member).read()  # type: ignore[union-attr]
        raise KeyError(f"{key} is not in {row['path']}")
    media = media_column(row["format"])
    table = pq.read_table(io.BytesIO(data), columns=["sample_key", media])
    for sample in table.to_pylist():
        if sample["sample_key"] == key:
            return sample[media]["bytes"]
    raise KeyError(f"{key} is not in {row['path']}")
