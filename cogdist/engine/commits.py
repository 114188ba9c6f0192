"""The driver's commits, on a thread of their own.

A commit stores a journal part (and, now and then, folds the journal into index/): a few requests
to OUT, seconds on a distant store. Made in the loop, they would stop it from handing out units
and replicas would run dry. Here one commit at a time runs on a thread while the loop goes on;
rows that finish meanwhile wait in memory and reach the sink when it is done, exactly as rows
that finish between two commits always have: durable at the next one, rendered again after a
killed driver.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from cogdist.errors import StorageError
from cogdist.sink.journal import JOURNAL

if TYPE_CHECKING:
    from cogdist.scheduler import Failed, Finished
    from cogdist.sink.base import Sink

log = logging.getLogger(__name__)


class Commits:
    """A Sink's rows and commits: `add` hands it rows, `start` begins a commit in the background,
    `poll` takes a finished one in, `finish` makes the job's last commit."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cogdist-commit")
        self._running: Future | None = None
        self._waiting: list[tuple[list[Finished], list[Failed], int | None]] = []
        self.last: float = time.perf_counter()
        """perf_counter() after the last commit."""
        self.failed: bool = False
        """The store refused the index for --storage-timeout: the final commit is not tried again."""

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def pending(self) -> int:
        """Rows the next commit would write (0 while one runs)."""
        return 0 if self.busy else self.sink.pending

    def add(self, finished: list[Finished], failed: list[Failed], replica: int | None = None) -> None:
        if self.busy:
            self._waiting.append((finished, failed, replica))
            return
        self.sink.add(finished, failed, replica)
        if self.sink.wants_commit:  # a full shard: store it now
            self.start(flush=True)

    def start(self, flush: bool = False) -> None:
        """Begin a commit of what the sink holds (`flush`: its partial shard too), unless one runs."""
        if not self.busy:
            self._running = self._thread.submit(self.sink.commit, flush, False)

    def poll(self, wait: bool = False) -> None:
        """Take in a finished commit (`wait`: wait for the running one); raises its StorageError."""
        if self._running is None or not (wait or self._running.done()):
            return
        running, self._running = self._running, None
        self._checked(running.result)
        self.last = time.perf_counter()
        waiting, self._waiting = self._waiting, []
        for finished, failed, replica in waiting:
            self.add(finished, failed, replica)

    def finish(self) -> None:
        """The job's last commit, into index/ itself, after the running one; nothing after a
        commit the store refused. The journal parts it folded are deleted in the background
        (while the replicas are torn down): `close` waits for that."""
        try:
            while self.busy and not self.failed:
                self.poll(wait=True)  # again when the rows it held back filled a shard
            if not self.failed:
                self._checked(lambda: self.sink.commit(True, True))
                self.last = time.perf_counter()
                self._running = self._thread.submit(self.sink.clean_up)
        finally:
            self._thread.shutdown(wait=False)

    def close(self) -> None:
        """Wait for `finish`'s clean-up. A part it could not delete only costs a later reader time
        (every reader skips a folded part), so that is a warning, not the job's failure."""
        running, self._running = self._running, None
        if running is None:
            return
        try:
            running.result()
        except StorageError as e:
            log.warning("folded journal parts are left under %s: %s", JOURNAL, e)

    def _checked(self, commit) -> None:
        try:
            commit()
        except StorageError as e:
            self.failed = True
            raise StorageError(
                f"stopped: the index cannot be written ({e}). Rows rendered since the last commit will "
                "be rendered again; run the same command again to resume once the store is reachable."
            ) from None
