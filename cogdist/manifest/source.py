"""Finding and streaming the Parquet files of a manifest.

A manifest is one Parquet file, a folder of them (searched recursively) or a glob, on local disk
or in an object store. It is read a record batch at a time (never more than one row group of one
file in memory), so a manifest of any length streams in bounded memory.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cogdist.errors import ManifestError, ManifestProblem
from cogdist.manifest.columns import ColumnView, column_view
from cogdist.storage import Location, open_location

_GLOB_CHARS = "*?["
BATCH_ROWS = 65_536
# What a corrupt or truncated file raises: besides ArrowInvalid and OSError, a damaged footer
# gives ArrowNotImplementedError ("Integers with more than 64 bits") or, for column names that
# are not UTF-8, UnicodeDecodeError (a ValueError).
_UNREADABLE = (pa.ArrowException, OSError, ValueError)


@dataclass(frozen=True)
class ManifestFile:
    path: str  # inside the file system
    name: str  # for messages: the public URI (no credentials)
    num_rows: int


@dataclass(frozen=True)
class ManifestBatch:
    file: ManifestFile
    first_row: int  # row number of the batch's first row within its file
    batch: pa.RecordBatch
    """Its columns as cogdist reads them (see cogdist.manifest.columns)."""
    view: ColumnView | None = None
    """How they were named; None: as the manifest names them."""

    def manifest_name(self, column: str) -> str | None:
        """The manifest's own name of `column`, where --column-map or an index renamed it."""
        return self.view.manifest_name(column) if self.view is not None else None


class ManifestSource:
    """The files of one manifest, their common schema, and batches of their rows in order, with
    the columns under the names cogdist reads (`column_map`, a parsed --column-map, and the
    renaming of an index read as a manifest: cogdist.manifest.columns)."""

    def __init__(self, uri: str, column_map: dict[str, str] | None = None):
        self.uri = uri
        self.location, paths = _find_files(uri)
        if not paths:
            raise ManifestError([ManifestProblem(f"no Parquet files found at {self.location.public_uri}")])
        self.files: list[ManifestFile] = []
        schema: pa.Schema | None = None
        first_name = ""
        problems = []
        for path in paths:
            name = self._name(path)
            try:
                meta = pq.ParquetFile(self.location.fs.open_input_file(path)).metadata
                file_schema = meta.schema.to_arrow_schema()
            except _UNREADABLE as e:
                problems.append(ManifestProblem(f"not a readable Parquet file ({e})", file=name))
                continue
            if schema is None:
                schema, first_name = file_schema, name
            elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
                problems.append(
                    ManifestProblem(
                        f"its columns differ from {first_name}: {_columns(file_schema)} vs {_columns(schema)}",
                        file=name,
                    )
                )
                continue
            self.files.append(ManifestFile(path, name, meta.num_rows))
        if problems:
            raise ManifestError(problems[:20], total=len(problems))
        if schema is None:  # no files: ManifestSource refuses an empty match above
            raise ManifestError([ManifestProblem(f"no Parquet schema read at {self.location.public_uri}")])
        self.view = column_view(schema.remove_metadata(), column_map)
        self.schema: pa.Schema = self.view.schema
        """The columns as cogdist reads them (the manifest's own: `view.raw`)."""

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def _name(self, path: str) -> str:
        rel = path[len(self.location.root) :].lstrip("/")
        return self.location.uri_of(rel) if rel else self.location.public_uri

    def batches(self, columns: list[str] | None = None) -> Iterator[ManifestBatch]:
        """Every row of every file, in order, `BATCH_ROWS` at a time (one row group at most);
        `columns` (names as cogdist reads them) reads only the manifest's columns they need."""
        read = self.view.read_columns(columns)
        for file in self.files:
            try:
                reader = pq.ParquetFile(self.location.fs.open_input_file(file.path))
                first_row = 0
                for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=read):
                    yield ManifestBatch(file, first_row, self.view.apply(batch, columns), self.view)
                    first_row += batch.num_rows
            except _UNREADABLE as e:
                raise ManifestError([ManifestProblem(f"cannot be read: {e}", file=file.name)]) from e
            if first_row != file.num_rows:
                # Seen with damaged footers: pyarrow reads fewer rows (even none) without an error.
                # Validation reads every batch, so this stops a run before it silently skips rows.
                raise ManifestError(
                    [
                        ManifestProblem(
                            f"cannot be read: its footer says {file.num_rows} rows, {first_row} could be read",
                            file=file.name,
                        )
                    ]
                )


def _columns(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}:{f.type}" for f in schema)


def _find_files(uri: str) -> tuple[Location, list[str]]:
    """The manifest's Parquet files, sorted, and the location they were found in."""
    pattern = None
    base, prefix = uri, ""
    if any(c in uri for c in _GLOB_CHARS):
        # List from the folder above the first component holding a glob character.
        head, _, _ = uri.partition(next(c for c in uri if c in _GLOB_CHARS))
        base = head.rsplit("/", 1)[0] if "/" in head else "."
        prefix = f"{base}/" if "/" in head else ""
        pattern = uri
    location = open_location(base)
    fs = location.fs
    info = fs.get_file_info(location.root)
    if pattern is None:
        if info.type == pafs.FileType.File:
            return location, [location.root]
        if info.type == pafs.FileType.NotFound:
            raise ManifestError([ManifestProblem(f"{location.public_uri} does not exist")])
    elif info.type != pafs.FileType.Directory:
        raise ManifestError(
            [ManifestProblem(f"{location.public_uri} (base of pattern {uri!r}) does not exist")]
        )
    selector = pafs.FileSelector(location.root, recursive=True)
    paths = []
    for entry in fs.get_file_info(selector):
        rel = entry.path[len(location.root) :].lstrip("/")
        if entry.type != pafs.FileType.File or any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if pattern is None:
            if entry.path.endswith(".parquet"):
                paths.append(entry.path)
        elif _glob_match(prefix + rel, pattern):
            paths.append(entry.path)
    return location, sorted(paths)


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match where `*` stays inside one path component and `**` crosses them."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts)
    )
