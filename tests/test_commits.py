"""The driver's commits on their own thread (cogdist.engine.commits): rows that finish during a
commit wait for the next one, a refused commit stops the job without a final commit."""

from __future__ import annotations

import threading

import pytest

from cogdist.engine.commits import Commits
from cogdist.errors import StorageError


class SlowSink:
    """The Sink calls Commits makes, recorded; each commit waits until `release` is set."""

    def __init__(self, fail: bool = False):
        self.rows: list[str] = []
        self.committed: list[tuple[list[str], bool, bool]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.wants_commit = False

    @property
    def pending(self) -> int:
        return len(self.rows)

    def add(self, finished, failed, replica=None) -> None:
        self.rows += finished

    def commit(self, flush: bool, final: bool) -> None:
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise StorageError("s3://bucket/out/_cogdist/journal/part-1.parquet: connection refused")
        self.committed.append((self.rows, flush, final))
        self.rows = []

    def clean_up(self) -> None:
        self.committed.append(([], False, "clean-up"))


def test_rows_finished_during_a_commit_wait_for_the_next_one():
    sink = SlowSink()
    commits = Commits(sink)
    commits.add(["a", "b"], [])
    commits.start()
    assert sink.entered.wait(10) and commits.busy
    commits.add(["c"], [])  # the commit thread holds the sink's rows: not touched meanwhile
    assert sink.rows == ["a", "b"] and commits.pending == 0
    commits.start()  # one commit at a time
    commits.poll()
    assert commits.busy  # not done yet: poll does not wait
    sink.release.set()
    commits.poll(wait=True)
    assert sink.committed == [(["a", "b"], False, False)] and sink.rows == ["c"] and not commits.busy
    commits.finish()
    commits.close()  # the clean-up after the final commit, waited for
    assert sink.committed[-2:] == [(["c"], True, True), ([], False, "clean-up")]


def test_a_refused_commit_stops_the_job_and_no_final_commit_is_tried():
    sink = SlowSink(fail=True)
    commits = Commits(sink)
    commits.add(["a"], [])
    commits.start()
    sink.release.set()
    with pytest.raises(
        StorageError, match="the index cannot be written .*connection refused.*run the same command"
    ):
        commits.poll(wait=True)
    assert commits.failed
    sink.fail = False
    commits.finish()
    assert sink.committed == []  # the store refused for --storage-timeout: not waited for again


def test_the_last_commit_waits_for_the_running_one():
    sink = SlowSink()
    commits = Commits(sink)
    commits.add(["a"], [])
    commits.start()
    assert sink.entered.wait(10)
    commits.add(["b"], [])
    threading.Timer(0.2, sink.release.set).start()
    commits.finish()
    commits.close()
    assert sink.committed == [(["a"], False, False), (["b"], True, True), ([], False, "clean-up")]
