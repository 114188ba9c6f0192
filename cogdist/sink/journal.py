"""The index's journal: finished rows are durable within --commit-interval, while index/ gains
parts in proportion to its rows, not to the hours a job runs.

Each commit writes the rows finished since the last one as one small part of _cogdist/journal,
which readers of OUT/index never see. The journal is *folded* into index/ (its rows written as
one new index part, then its parts deleted) once it holds FOLD_ROWS rows, once the fold interval
has passed, and when the job ends. The fold interval is the commit interval at first and doubles
with every fold up to --index-interval: a short job's index fills as quickly as it always did,
and a week-long one adds a part every --index-interval.

A killed driver leaves journal parts behind, the last ones perhaps already folded: a resume
folds the rows the index lacks and deletes the parts (`recover`); readers while a job runs
(`done_ids`, `read_done`) add the journal's rows the index lacks. So index/ holds every id at
most once at every moment, and index/ with the journal holds every finished id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from cogdist.sink.ledger import INDEX, PartWriter, ids_of, read_ids, read_schema, read_table
from cogdist.storage import Location

log = logging.getLogger(__name__)

JOURNAL = "_cogdist/journal"
FOLD_ROWS = 10_000
"""The journal is folded into index/ once it holds this many rows, whatever the interval."""
DEFAULT_INDEX_INTERVAL = 600.0
DELETERS = 8
"""Folded journal parts deleted at once."""


class IndexWriter:
    """Buffers index rows; `commit` makes them durable in the journal and folds it when due."""

    def __init__(
        self,
        location: Location,
        schema: pa.Schema,
        commit_interval: float,
        index_interval: float = DEFAULT_INDEX_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.location = location
        self.schema = schema
        self.clock = clock
        self.journal = PartWriter(location, JOURNAL, schema)
        self.index = PartWriter(location, INDEX, schema)
        self.held: list[tuple[str, pa.Table]] = []
        """The journal parts written and not folded yet: (name, rows)."""
        self._deleter = ThreadPoolExecutor(DELETERS, thread_name_prefix="cogdist-fold")
        self._deletions: list[Future] = []
        """Deletions of folded journal parts, running or not yet checked."""
        self.max_gap = max(index_interval, commit_interval)
        self.gap = commit_interval
        self.last_fold = clock()
        self.folds = 0

    @property
    def pending(self) -> int:
        """Rows not durable yet (not in the journal)."""
        return self.journal.pending

    @property
    def journaled(self) -> int:
        """Rows in the journal, not folded into index/ yet."""
        return sum(table.num_rows for _, table in self.held)

    def add(self, rows: list[dict]) -> None:
        self.journal.add(rows)

    def commit(self, final: bool = False) -> None:
        """Journal the buffered rows; fold the journal into index/ when due or `final` (at the end
        of the job: the buffered rows then go straight into the folded part). Folded journal
        parts are deleted in the background: `clean_up` waits for that. On a StorageError rows stay buffered or journaled,
        as they were."""
        if final:
            tables = [table for _, table in self.held]
            if self.journal.rows:
                tables.append(self.journal.table())
            if tables:
                self._fold(tables)
            self.journal.rows = []
            return
        if self.journal.rows:
            table = self.journal.table()
            self.held.append((self.journal.write(table), table))
            self.journal.rows = []
        if self.held and (self.journaled >= FOLD_ROWS or self.clock() - self.last_fold >= self.gap):
            self._fold([table for _, table in self.held])

    def _fold(self, tables: list[pa.Table]) -> None:
        self.index.write(pa.concat_tables(tables))
        # From here the rows are in index/: every reader skips the folded parts, so they are
        # deleted in the background (one request each, which a distant store answers slowly) and
        # a failed or cut-short deletion leaves parts `recover` skips.
        self._deletions = [f for f in self._deletions if not (f.done() and _deleted(f))]
        self._deletions += [self._deleter.submit(self.location.delete, name) for name, _ in self.held]
        self.held = []
        self.folds += 1
        self.last_fold = self.clock()
        self.gap = min(self.gap * 2, self.max_gap)

    def clean_up(self) -> None:
        """Wait for the folded journal parts' deletions (StorageError: one failed)."""
        deletions, self._deletions = self._deletions, []
        for deletion in deletions:
            deletion.result()


def _deleted(deletion: Future) -> bool:
    """Whether a finished deletion succeeded; a failed one is only a warning (the part is skipped)."""
    if deletion.exception() is not None:
        log.warning("a folded journal part is left under %s: %s", JOURNAL, deletion.exception())
    return True


def _outside(table: pa.Table, ids: pa.Array) -> pa.Table:
    """The rows of `table` whose id is not in `ids`."""
    if len(ids) == 0:
        return table
    inside = pc.fill_null(pc.is_in(table["id"].cast(pa.string()), value_set=ids), False)
    return table.filter(pc.invert(inside))


def recover(location: Location, index_ids: pa.Array) -> pa.Array:
    """Fold what a killed driver left in the journal into index/ (the rows whose ids `index_ids`,
    the index's, lacks) and delete the journal's parts; the ids added to the index."""
    parts = location.list_files(JOURNAL, ".parquet")
    table = read_table(location, JOURNAL)
    added = pa.array([], pa.string())
    if table is not None:
        rows = _outside(table, index_ids)
        if rows.num_rows:
            PartWriter(location, INDEX, rows.schema).write(rows)
            added = rows["id"].cast(pa.string()).combine_chunks()
    for part in parts:
        location.delete(f"{JOURNAL}/{part.base_name}")
    return added


def done_ids(location: Location) -> pa.Array:
    """Every finished id, once: index/'s and the journal's (read first, so that rows folded in
    between are found in the index)."""
    journal = read_table(location, JOURNAL, ["id"])
    indexed = read_ids(location, INDEX)
    if journal is None:
        return indexed
    return pa.concat_arrays([indexed, _outside(journal, indexed)["id"].cast(pa.string()).combine_chunks()])


def read_done(
    location: Location, columns: list[str] | None = None, filter: ds.Expression | None = None
) -> pa.Table | None:
    """`columns` of every finished row matching `filter`, once (index/'s and the journal's, read
    first); None when no row is done."""
    wanted = None if columns is None else list(dict.fromkeys(["id", *columns]))
    journal = read_table(location, JOURNAL, wanted, filter)
    table = read_table(location, INDEX, wanted, filter)
    if journal is not None:
        indexed = ids_of(table) if table is not None else pa.array([], pa.string())
        journal = _outside(journal, indexed)
        table = journal if table is None else pa.concat_tables([table, journal], promote_options="default")
    return table if table is None or columns is None else table.select(columns)


def done_schema(location: Location) -> pa.Schema | None:
    """The columns `read_done` can read (None when no row is done yet)."""
    return read_schema(location, INDEX) or read_schema(location, JOURNAL)
