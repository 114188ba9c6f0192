"""How a manifest's columns are read: `--column-map` (id=key,prompt=caption,image=url), and the
index of an earlier job read as a manifest (jobs that feed jobs).

`ColumnView` presents the manifest's columns under the names the rest of cogdist reads. Every
column keeps its own name, and a mapped column also shows under cogdist's name, the same Arrow
array (no copy): the index of `--column-map prompt=caption` has both `caption` and `prompt`.
An index of a finished job (known by its result columns) keeps `id` and `prompt` and carries
every other column under a `src_` prefix (src_uri, src_seed; src_x becomes src_src_x), so the
earlier job's seed or size is never read as this job's; `--column-map` names the index's own
columns (`image=uri` reads `uri`, shown as `image` and `src_uri`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cogdist.errors import ManifestError, ManifestProblem, UsageError
from cogdist.manifest.schema import COLUMNS

SOURCE_PREFIX = "src_"
# Result columns every cogdist index has held since its first version: a manifest with all of
# them is the index of a cogdist job (a plain manifest with any of them is refused: reserved).
INDEX_MARKERS = ("uri", "path", "model", "format", "finished_at")
KEPT_FROM_INDEX = ("id", "prompt")
SHARD_KEY = SOURCE_PREFIX + "sample_key"  # an index row's sample_key, as its index is read
Reason = Callable[[int], str]


def parse_column_map(text: str | None) -> dict[str, str]:
    """cogdist's column name -> the manifest's column it is read from ({} for None)."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        name, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not name or not column:
            raise UsageError(f"--column-map {text!r}: {pair!r} is not NAME=COLUMN (e.g. prompt=caption)")
        if name not in COLUMNS:
            raise UsageError(f"--column-map: {name!r} is not a column cogdist reads ({', '.join(COLUMNS)})")
        if name in mapping:
            raise UsageError(f"--column-map: {name!r} is mapped twice")
        mapping[name] = column
    return mapping


def column_map_record(text: str | None) -> dict[str, str] | None:
    """The job record's value of --column-map: the parsed map, null when none is given."""
    return parse_column_map(text) or None


def is_index(schema: pa.Schema) -> bool:
    """Whether `schema` is that of a cogdist index (OUT/index of an earlier job)."""
    return all(name in schema.names for name in INDEX_MARKERS)


@dataclass(frozen=True)
class ColumnView:
    """The manifest's columns under the names cogdist reads them by."""

    fields: tuple[tuple[str, int], ...]
    """(name shown, index of the manifest's column), in the order shown."""
    raw: pa.Schema
    """The manifest's own columns."""
    mapped: dict[str, str]
    """cogdist's name -> the manifest's column it reads (--column-map; a self-map only where an index
    shows the column under src_)."""
    chained: bool
    """The manifest is the index of an earlier job."""

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([self.raw.field(index).with_name(name) for name, index in self.fields])

    def manifest_name(self, name: str) -> str | None:
        """The manifest's own name of the column shown as `name`, where the two differ."""
        for shown, index in self.fields:
            if shown == name:
                raw = self.raw.names[index]
                return raw if raw != name else None
        return None

    def read_columns(self, names: Iterable[str] | None) -> list[str] | None:
        """The manifest's columns to read to show `names` (None: all)."""
        if names is None:
            return None
        wanted = set(names)
        return list(dict.fromkeys(self.raw.names[index] for shown, index in self.fields if shown in wanted))

    def apply(self, batch: pa.RecordBatch, names: Iterable[str] | None = None) -> pa.RecordBatch:
        """`batch` of the manifest (all columns, or those `read_columns(names)` gives) as shown."""
        if names is None:
            if not self.mapped and not self.chained:
                return batch
            chosen = list(self.fields)
            arrays = [batch.column(index) for _, index in chosen]
        else:
            wanted = set(names)
            chosen = [(shown, index) for shown, index in self.fields if shown in wanted]
            arrays = [batch.column(self.raw.names[index]) for _, index in chosen]
        schema = pa.schema([self.raw.field(index).with_name(shown) for shown, index in chosen])
        return pa.RecordBatch.from_arrays(arrays, schema=schema)


def column_view(raw: pa.Schema, column_map: dict[str, str] | None) -> ColumnView:
    """The view of a manifest of columns `raw` read through `column_map`; ManifestError (naming
    the columns) for a map this manifest cannot be read with."""
    column_map = dict(column_map or {})
    chained = is_index(raw)
    names = raw.names
    problems = []
    columns = ", ".join(names)
    for name, column in column_map.items():
        if column not in names:
            problems.append(
                ManifestProblem(
                    f"--column-map {name}={column}: the manifest has no column {column!r} (columns: {columns})"
                )
            )
    sources: dict[str, list[str]] = {}
    for name, column in column_map.items():
        sources.setdefault(column, []).append(name)
    for column, mapped in sources.items():
        if len(mapped) > 1:
            pairs = ", ".join(f"{name}={column}" for name in mapped)
            problems.append(ManifestProblem(f"--column-map: the column {column!r} is mapped twice ({pairs})"))
    # A self-map reads the column as it is; in an index, one that is not kept under its name
    # (src_seed) also shows under cogdist's (seed).
    mapped = {
        name: column
        for name, column in column_map.items()
        if name != column or (chained and name not in KEPT_FROM_INDEX)
    }
    if not chained:
        for name, column in mapped.items():
            if name in names:
                problems.append(
                    ManifestProblem(
                        f"--column-map {name}={column}: the manifest also has a column {name!r}, so "
                        f"{name!r} would be ambiguous; drop {name}={column} from the map or rename the "
                        f"manifest's {name!r}"
                    )
                )
    if problems:
        raise ManifestError(problems)

    first = {name: names.index(name) for name in reversed(names)}  # a repeated name: its first
    fields: list[tuple[str, int]] = []
    for index, name in enumerate(names):
        kept = not chained or (name in KEPT_FROM_INDEX and name not in mapped)
        shown = name if kept else SOURCE_PREFIX + name
        fields.append((shown, index))
        if first[name] == index:
            fields.extend((cogdist_name, index) for cogdist_name, column in mapped.items() if column == name)
    return ColumnView(tuple(fields), raw, mapped, chained)


def index_inputs(batch: pa.RecordBatch, view: ColumnView | None) -> Iterator[tuple[str, pa.Array, Reason]]:
    """(column, rows, reason) of the inputs an index read as a manifest cannot give: an `image` or
    `video` mapped from the `uri` or `path` of an output stored inside a shard (the earlier job
    ran with --dataset webdataset or parquet: its `uri` names the shard, not a file), or from a
    `path` (relative to the earlier job's OUT: its `uri` is what can be opened)."""
    if view is None or not view.chained:
        return
    inputs = [
        n for n in ("image", "video") if view.mapped.get(n) in ("uri", "path") and n in batch.schema.names
    ]
    if not inputs:
        return
    keys = (
        batch.column(SHARD_KEY) if SHARD_KEY in batch.schema.names else pa.nulls(batch.num_rows, pa.string())
    )
    in_shard = pc.greater(pc.utf8_length(pc.fill_null(keys, "")), 0)

    def in_shard_reason(i: int) -> str:
        return (
            f"the earlier job stored this row inside a shard (its sample_key {keys[i].as_py()!r}), "
            "not as a file of its own: a job written with --dataset webdataset or parquet cannot feed "
            "another by its uri or path; render it with --dataset files to chain it"
        )

    for name in inputs:
        yield name, in_shard, in_shard_reason
        if view.mapped[name] == "path":
            reason = f"is a path inside the earlier job's OUT; map its uri instead (--column-map {name}=uri)"
            yield name, pc.invert(in_shard), reason
