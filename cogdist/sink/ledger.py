"""The index and the failure records: folders of Parquet parts, appended by the driver alone.

Each commit writes one new part, whole, under a name no other commit uses, and a retry of the
same commit rewrites that same name; a part is therefore either entirely visible or absent, and
an id enters the index exactly once. `pyarrow.dataset.dataset(OUT + "/index")` reads it as one
table at any moment; names starting with '.' or '_' (temporary files) are ignored by pyarrow.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from cogdist.storage import Location
from cogdist.work import ItemResult, WorkItem

log = logging.getLogger(__name__)

INDEX = "index"
FAILURES = "failures"
QUARANTINE = "_cogdist/quarantine"


@dataclass(frozen=True)
class Outcome:
    """What one index row is made of: a rendered row and where and how it was stored."""

    item: WorkItem
    result: ItemResult
    attempts: int
    out: Location
    model: str
    format: str
    replica: int | None


@dataclass(frozen=True)
class Column:
    """One column cogdist writes into every index row: its type and its value."""

    field: pa.Field
    value: Callable[[Outcome], Any] | None
    """None: written by the sink that stores the output (a shard's sample key)."""


def _frames(o: Outcome) -> int | None:
    return o.result.frames or o.item.num_frames


def _duration(o: Outcome) -> float | None:
    frames = _frames(o)
    return frames / o.item.fps if frames and o.item.fps else None


ADAPTERS_TYPE = pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64()), ("sha256", pa.string())]))


def _adapters(o: Outcome) -> list[dict] | None:
    """The LoRA adapters a row was rendered with (null: the base model)."""
    return [{"name": n, "scale": s, "sha256": h} for n, s, h in o.item.adapters] or None


# The columns of every index row, after the manifest's own, declared once: the index schema, the
# rows the sinks write and the manifest's reserved names derive from them. Manifest columns of
# the same name (seed, width, ...) are replaced by the effective values.
RESULT_COLUMNS = (
    Column(pa.field("uri", pa.string()), lambda o: o.out.uri_of(o.item.output)),
    Column(pa.field("path", pa.string()), lambda o: o.item.output),
    Column(pa.field("seed", pa.int64()), lambda o: o.item.seed),
    Column(pa.field("width", pa.int64()), lambda o: o.item.width),
    Column(pa.field("height", pa.int64()), lambda o: o.item.height),
    Column(pa.field("num_frames", pa.int64()), _frames),
    Column(pa.field("fps", pa.float64()), lambda o: o.item.fps),
    Column(pa.field("duration", pa.float64()), _duration),
    Column(pa.field("task", pa.string()), lambda o: o.item.task),
    Column(pa.field("frames_path", pa.string()), lambda o: o.item.frames_dir),
    Column(pa.field("num_inference_steps", pa.int64()), lambda o: o.item.num_inference_steps),
    Column(pa.field("guidance_scale", pa.float64()), lambda o: o.item.guidance_scale),
    Column(pa.field("model", pa.string()), lambda o: o.model),
    Column(pa.field("format", pa.string()), lambda o: o.format),
    Column(pa.field("bytes", pa.int64()), lambda o: o.result.bytes_written),
    Column(pa.field("sha256", pa.string()), lambda o: o.result.sha256),
    Column(pa.field("sample_key", pa.string()), None),
    Column(pa.field("render_seconds", pa.float64()), lambda o: o.result.render_seconds),
    Column(pa.field("io_seconds", pa.float64()), lambda o: o.result.io_seconds),
    Column(pa.field("compile_seconds", pa.float64()), lambda o: o.result.compile_seconds),
    Column(pa.field("replica", pa.int64()), lambda o: o.replica),
    Column(pa.field("node", pa.string()), lambda o: o.result.node),
    Column(pa.field("finished_at", pa.timestamp("ms", tz="UTC")), lambda o: now_utc()),
    Column(pa.field("attempts", pa.int64()), lambda o: o.attempts),
    Column(pa.field("adapters", ADAPTERS_TYPE), _adapters),
    Column(pa.field("sample_index", pa.int64()), lambda o: o.item.sample_index),
    Column(pa.field("source_id", pa.string()), lambda o: o.item.source_id or o.item.id),
)
RESULT_FIELDS = [column.field for column in RESULT_COLUMNS]


def index_row(manifest_row: dict, outcome: Outcome) -> dict:
    """The index row of a rendered manifest row: its own columns, then RESULT_COLUMNS' values."""
    row = dict(manifest_row)
    row["id"] = outcome.item.id
    for column in RESULT_COLUMNS:
        if column.value is not None:
            row[column.field.name] = column.value(outcome)
    return row


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("failed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def index_schema(manifest_schema: pa.Schema) -> pa.Schema:
    ours = {f.name for f in RESULT_FIELDS}
    kept = [f for f in manifest_schema if f.name not in ours]
    # Ids are stored as plain strings whatever string type the manifest used.
    kept = [pa.field("id", pa.string()) if f.name == "id" else f for f in kept]
    return pa.schema(kept + RESULT_FIELDS)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


class PartWriter:
    """Buffers rows and commits them as one new Parquet part of `folder`."""

    def __init__(self, location: Location, folder: str, schema: pa.Schema):
        self.location = location
        self.folder = folder
        self.schema = schema
        self.session = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.sequence = 0
        self.rows: list[dict] = []

    @property
    def pending(self) -> int:
        return len(self.rows)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def table(self) -> pa.Table:
        """The buffered rows as a table of `schema`."""
        return pa.Table.from_pylist(self.rows, schema=self.schema)

    def commit(self) -> int:
        """Write the buffered rows as one part; on failure they stay buffered for the next try."""
        if not self.rows:
            return 0
        self.write(self.table())
        written, self.rows = len(self.rows), []
        return written

    def write(self, table: pa.Table) -> str:
        """Store `table` as the next part of `folder`, whole; its name relative to the location."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        name = f"{self.folder}/part-{self.session}-{self.sequence:06d}.parquet"
        self.location.write_bytes(name, buffer.getvalue(), durable=True)
        self.sequence += 1
        return name


def read_ids(location: Location, folder: str) -> pa.Array:
    """The `id` column of every part under `folder` (empty when there is none)."""
    table = read_table(location, folder, ["id"])
    return ids_of(table) if table is not None else pa.array([], pa.string())


def read_table(
    location: Location,
    folder: str,
    columns: list[str] | None = None,
    filter: ds.Expression | None = None,
) -> pa.Table | None:
    """`columns` of the rows matching `filter` in every part under `folder`, as one table (None
    when there is no part).

    A part whose bytes cannot be parsed (only a write that failed half-way and was never
    acknowledged can leave one) is moved to _cogdist/quarantine, so the folder stays readable;
    its rows were never counted as done and are rendered again. A part that fails to read for
    another reason (a store's transient 403 or 5xx, an outage) is read again first: one deleted
    meanwhile is skipped, one whose store keeps failing raises, and only one that still fails
    while its store lists it is quarantined.
    """
    parts = location.list_files(folder, ".parquet")
    if not parts:
        return None
    try:
        dataset = ds.dataset([p.path for p in parts], filesystem=location.fs, format="parquet")
        return dataset.to_table(columns=columns, filter=filter)
    except (pa.ArrowInvalid, OSError):
        pass
    tables = []
    for part in parts:
        try:
            table = _read_part(location, part.path, columns, filter)
        except _Unreadable as unreadable:
            e = unreadable.__cause__
            target = location.path(f"{QUARANTINE}/{part.base_name}")
            log.warning("moving unreadable part %s to %s: %s", part.base_name, QUARANTINE, e)
            location.fs.create_dir(location.path(QUARANTINE), recursive=True)
            location.fs.move(part.path, target)
            continue
        if table is not None:
            tables.append(table)
    return pa.concat_tables(tables, promote_options="default") if tables else None


PART_READS = 3
"""Reads of one part before a failure that is not a parse error counts as its content's."""


class _Unreadable(Exception):
    """A part whose content, not its store, fails to read (the cause says how)."""


def _read_part(
    location: Location, path: str, columns: list[str] | None, filter: ds.Expression | None
) -> pa.Table | None:
    """One part's table; None when it was deleted since the listing (a journal part, folded
    meanwhile). Raises _Unreadable for a part to quarantine; the store's own OSError, when a
    lookup fails too, means the store and not the part is failing."""
    for attempt in range(PART_READS):
        try:
            return pq.read_table(path, columns=columns, filters=filter, filesystem=location.fs)
        except FileNotFoundError:
            return None
        except pa.ArrowInvalid as e:
            raise _Unreadable() from e  # not a Parquet file: a half-written part
        except OSError as e:
            # A corrupt page and a refused request both arrive as OSError: ask the store.
            if location.fs.get_file_info(path).type == FileType.NotFound:
                return None
            if attempt == PART_READS - 1:
                raise _Unreadable() from e
            time.sleep(0.2 * (attempt + 1))
    return None


def ids_of(table: pa.Table) -> pa.Array:
    """The `id` column of `table` as one string array."""
    column = table.column("id").cast(pa.string())
    return column.combine_chunks() if column.num_chunks else pa.array([], pa.string())


def read_schema(location: Location, folder: str) -> pa.Schema | None:
    """The columns `read_table` can read from `folder` (None when it has no part yet)."""
    dataset = _dataset(location, folder)
    return None if dataset is None else dataset.schema


def _dataset(location: Location, folder: str) -> ds.Dataset | None:
    parts = location.list_files(folder, ".parquet")
    if not parts:
        return None
    return ds.dataset([p.path for p in parts], filesystem=location.fs, format="parquet")
