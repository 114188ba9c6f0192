"""The index's journal: commits are durable at once, index/ gains parts only at folds, and at
every moment (a fold cut short included) every finished id is found exactly once."""

from __future__ import annotations

import shutil

import pyarrow.dataset as ds
import pytest

from cogdist.sink.journal import FOLD_ROWS, JOURNAL, IndexWriter, done_ids, read_done, recover
from cogdist.sink.ledger import INDEX, index_schema, read_ids
from cogdist.storage import open_location
from tests.test_ledger import MANIFEST, index_row


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_index_ids(out) -> list[str]:
    """The ids a plain `pyarrow.dataset` reader of OUT/index sees."""
    try:
        return ds.dataset(out.path(INDEX), filesystem=out.fs, format="parquet").to_table()["id"].to_pylist()
    except (FileNotFoundError, OSError):
        return []


def parts(out, folder: str) -> int:
    return len(out.list_files(folder, ".parquet"))


def location(where: str, tmp_path, request):
    if where == "s3":
        return open_location(f"s3://{request.getfixturevalue('s3_bucket')}/job")
    return open_location(str(tmp_path))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_commits_are_journaled_and_folded_into_fewer_index_parts(tmp_path, where, request):
    out = location(where, tmp_path, request)
    clock = Clock()
    writer = IndexWriter(out, index_schema(MANIFEST), commit_interval=2.0, index_interval=8.0, clock=clock)
    finished: list[str] = []
    gaps = []
    for i in range(12):  # a commit every 2 s, 3 rows each
        rows = [index_row(3 * i + k) for k in range(3)]
        writer.add(rows)
        finished += [row["id"] for row in rows]
        clock.now += 2.0
        folds = writer.folds
        writer.commit()
        if writer.folds > folds:
            gaps.append(clock.now)
        # Durable at once, visible to readers once each; a plain index reader never sees one twice.
        assert sorted(done_ids(out).to_pylist()) == sorted(finished)
        assert sorted(read_done(out, ["path"])["path"].to_pylist()) == sorted(
            f"outputs/{i}.png" for i in finished
        )
        indexed = plain_index_ids(out)
        assert len(indexed) == len(set(indexed)) and set(indexed) <= set(finished)
    # Folds after 2, then 4, then 8 s (the gap doubling up to --index-interval), then every 8 s.
    assert gaps == [2.0, 6.0, 14.0, 22.0]
    writer.clean_up()  # folded journal parts are deleted in the background
    assert parts(out, INDEX) == 4 and parts(out, JOURNAL) == 1  # 12 commits
    writer.add([index_row(99)])
    writer.commit(final=True)  # the end of the job: everything into index/
    assert sorted(plain_index_ids(out)) == sorted([*finished, "r99"])
    # Its folded journal part is deleted in the background: meanwhile readers skip it.
    assert parts(out, INDEX) == 5 and sorted(done_ids(out).to_pylist()) == sorted([*finished, "r99"])
    writer.clean_up()
    assert parts(out, JOURNAL) == 0 and sorted(done_ids(out).to_pylist()) == sorted([*finished, "r99"])


def test_a_full_journal_is_folded_before_its_interval(tmp_path):
    out = open_location(str(tmp_path))
    writer = IndexWriter(
        out, index_schema(MANIFEST), commit_interval=2.0, index_interval=600.0, clock=Clock()
    )
    writer.add([index_row(i) for i in range(FOLD_ROWS - 1)])
    writer.commit()
    assert parts(out, INDEX) == 0 and writer.journaled == FOLD_ROWS - 1
    writer.add([index_row(FOLD_ROWS)])
    writer.commit()
    assert parts(out, INDEX) == 1 and parts(out, JOURNAL) == 0 and len(read_ids(out, INDEX)) == FOLD_ROWS


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_fold_cut_short_leaves_each_id_once_and_recovery_indexes_the_rest(tmp_path, where, request):
    out = location(where, tmp_path, request)
    clock = Clock()
    writer = IndexWriter(out, index_schema(MANIFEST), commit_interval=2.0, index_interval=600.0, clock=clock)
    writer.add([index_row(0), index_row(1)])
    writer.commit()  # journaled, the first fold not due yet
    assert plain_index_ids(out) == [] and sorted(done_ids(out).to_pylist()) == ["r0", "r1"]
    saved = {
        info.base_name: out.read_bytes(f"{JOURNAL}/{info.base_name}") for info in out.list_files(JOURNAL)
    }
    writer.add([index_row(2)])
    clock.now += 2.0
    writer.commit()  # journals r2, folds r0..r2 into index/, deletes the journal parts
    writer.clean_up()
    assert parts(out, JOURNAL) == 0
    # A driver killed between the index part and the journal's deletion left this:
    for name, data in saved.items():
        out.write_bytes(f"{JOURNAL}/{name}", data)
    writer.add([index_row(3)])
    writer.journal.commit()  # ... and r3 journaled, never folded
    assert sorted(plain_index_ids(out)) == ["r0", "r1", "r2"]
    assert sorted(done_ids(out).to_pylist()) == ["r0", "r1", "r2", "r3"]  # r0, r1 once each
    assert read_done(out)["id"].to_pylist().count("r0") == 1

    added = recover(out, read_ids(out, INDEX))  # what the resume does first
    assert added.to_pylist() == ["r3"]
    assert sorted(plain_index_ids(out)) == ["r0", "r1", "r2", "r3"] and parts(out, JOURNAL) == 0
    assert recover(out, read_ids(out, INDEX)).to_pylist() == []  # a second resume adds nothing


def test_a_job_of_hours_writes_parts_by_the_index_interval_not_by_the_commit(tmp_path):
    out = open_location(str(tmp_path))
    clock = Clock()
    writer = IndexWriter(out, index_schema(MANIFEST), commit_interval=2.0, index_interval=60.0, clock=clock)
    for commit in range(900):  # 30 minutes at 10 rows/s, a commit every 2 s
        writer.add([index_row(20 * commit + k) for k in range(20)])
        clock.now += 2.0
        writer.commit()
    writer.commit(final=True)
    writer.clean_up()
    # 900 parts before the journal; now the ramp 2, 4, ... 32 s, then one a minute, then the last.
    assert parts(out, INDEX) <= 6 + 30 + 1
    assert len(set(plain_index_ids(out))) == 18_000 and parts(out, JOURNAL) == 0


def test_unreadable_journal_part_is_quarantined_not_indexed(tmp_path):
    out = open_location(str(tmp_path))
    writer = IndexWriter(out, index_schema(MANIFEST), commit_interval=2.0, clock=Clock())
    writer.add([index_row(0)])
    writer.commit()
    (tmp_path / JOURNAL / "part-zzz.parquet").write_bytes(b"PAR1 truncated")
    assert recover(out, read_ids(out, INDEX)).to_pylist() == ["r0"]
    assert (
        plain_index_ids(out) == ["r0"]
        and (tmp_path / "_cogdist" / "quarantine" / "part-zzz.parquet").exists()
    )
    shutil.rmtree(tmp_path / "_cogdist" / "quarantine")
