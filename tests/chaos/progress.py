"""Where a job is, as anyone outside it can see: what its driver printed, what OUT holds (job
record, index parts and rows, stored outputs), and the Ray workers of its session (alive,
loading the model, rendering a unit).

Fault injections choose their moment from these observations, never from the clock: a scenario
then strikes at the same points of a job on a slow machine as on a fast one, and a planned fault
that can no longer land (the job has finished) is reported as such instead of being counted.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pyarrow.fs as pafs

from cogdist.sink.job import JOB_RECORD
from cogdist.sink.journal import JOURNAL, done_ids, read_done
from cogdist.sink.naming import OUTPUTS
from cogdist.storage import Location

INDEX = "index"
POLL_SECONDS = 0.05
"""How often a watcher looks at a local OUT. Short next to every phase it has to catch (a commit
interval, a model load), so that a phase is seen however fast the machine runs it."""
REMOTE_POLL_SECONDS = 0.1
"""... at an OUT on an object store, where every look is a LIST request to the server."""

WORKER = "ray::RenderWorker"  # the title Ray gives a RenderWorker actor's process
LOADING = f"{WORKER}.setup"  # ... while it runs `setup` (joining the gang, loading the model)
RENDERING = f"{WORKER}.render"  # ... while it renders a unit


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session `sid` (zombies are dead and excluded)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def workers(sid: int, title: str = WORKER) -> list[psutil.Process]:
    """Worker processes of session `sid` whose title starts with `title` (see RENDERING)."""
    found = []
    for process in session_processes(sid):
        try:
            if " ".join(process.cmdline()).startswith(title):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def count_rows(location: Location) -> int:
    """Rows committed: in index/ or in its journal (durable, not folded yet), once each."""
    try:
        return len(done_ids(location))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def count_parts(location: Location, folder: str = INDEX) -> int:
    """Parts of index/ (or of the journal): one LIST, cheap enough to poll, even on S3."""
    try:
        return len(location.list_files(folder, ".parquet"))
    except OSError:
        return 0


def stored_outputs(location: Location) -> list[pafs.FileInfo]:
    """Files stored under OUT/outputs (indexed or not yet)."""
    selector = pafs.FileSelector(location.path(OUTPUTS), recursive=True, allow_not_found=True)
    try:
        return [info for info in location.fs.get_file_info(selector) if info.type == pafs.FileType.File]
    except OSError:
        return []


def indexed_paths(location: Location) -> set[str]:
    """Paths of the committed rows (index/ and journal)."""
    try:
        table = read_done(location, ["path"])
    except (FileNotFoundError, OSError, ValueError):
        return set()
    return set(table.column("path").to_pylist()) if table is not None else set()


class Watcher:
    """One attempt of a job (a driver in session `sid`, printing to `log`), observed from outside.

    `look()` refreshes what changes between commits; committed rows are recounted only when the
    number of parts (of index/ or its journal) changes, so polling stays cheap on an object store.
    """

    def __init__(self, location: Location, sid: int | None = None, log: Path | None = None):
        self.location = location
        self.sid = sid
        self.log = log
        self.started_ns = time.time_ns()
        self.parts = (count_parts(location), count_parts(location, JOURNAL))
        self.rows = self.start_rows = count_rows(location)
        self.commits = 0  # commits (to the journal or folds into index/) seen during this attempt
        self.grew = False  # the last look saw index/ gain a part: a fold of the journal
        self.changed = False  # the last look saw a commit of either kind
        self._indexed: set[str] | None = None  # committed paths, read when first needed after a commit

    def look(self) -> None:
        parts = (count_parts(self.location), count_parts(self.location, JOURNAL))
        self.grew = parts[0] != self.parts[0]
        self.changed = parts != self.parts
        if self.changed:
            self.parts, self.rows = parts, count_rows(self.location)
            self.commits += 1
            self._indexed = None

    @property
    def poll_seconds(self) -> float:
        return POLL_SECONDS if self.location.is_local else REMOTE_POLL_SECONDS

    @property
    def new_rows(self) -> int:
        """Rows committed during this attempt."""
        return self.rows - self.start_rows

    def printed(self) -> bool:
        """Has the driver printed a line (its first: manifest scanned, job record written)?"""
        return self.log is not None and self.log.exists() and self.log.stat().st_size > 0

    def job_record(self) -> bool:
        return self.location.exists(JOB_RECORD)

    def workers(self, title: str = WORKER) -> int:
        return len(workers(self.sid, title)) if self.sid is not None else 0

    def unindexed_outputs(self) -> int:
        """Outputs this attempt stored that are not committed yet (rendered, in no journal part)."""
        if self._indexed is None:
            self._indexed = indexed_paths(self.location)
        prefix = self.location.root.rstrip("/") + "/"
        # An object store's modification times are whole seconds.
        since = self.started_ns if self.location.is_local else self.started_ns - 1_000_000_000
        return sum(
            1
            for info in stored_outputs(self.location)
            if info.mtime_ns is not None
            and info.mtime_ns >= since
            and info.path.removeprefix(prefix) not in self._indexed
        )


# -- kill points ------------------------------------------------------------------------------

LAUNCH = "launch"  # before the driver has printed anything
SCANNED = "scanned"  # the driver printed its first line: manifest scanned, job record written
STARTING = "starting"  # worker actors exist, this attempt has committed nothing yet
RENDER = "render"  # after N rows of this attempt: a unit in flight, outputs stored, not committed
COMMIT = "commit"  # after N rows of this attempt: just after a fold of the journal into index/
STARTUP_POINTS = (LAUNCH, SCANNED, STARTING)
KILL_KINDS = (*STARTUP_POINTS, RENDER, COMMIT)


@dataclass(frozen=True)
class KillPoint:
    """A moment of a job's progress at which to strike."""

    kind: str
    rows: int = 0
    """RENDER and COMMIT: rows this attempt must have committed first (so every attempt progresses)."""

    def describe(self) -> str:
        return f"{self.kind}+{self.rows}" if self.kind in (RENDER, COMMIT) else self.kind

    def reached(self, watcher: Watcher) -> str | None:
        """What was seen when the point is reached (the record of the kill), else None."""
        if self.kind == LAUNCH:
            return "before its first line" if not watcher.printed() else "after its first line (late)"
        if self.kind == SCANNED:
            if watcher.printed():
                return f"first line printed, job record {'in place' if watcher.job_record() else 'missing'}"
            return None
        if self.kind == STARTING:
            if watcher.commits:  # the phase passed between two looks: strike at once, and say so
                return f"missed the start; struck at this attempt's first commit ({watcher.rows} committed)"
            alive = watcher.workers()
            if alive:
                return f"{alive} worker(s) up, {watcher.workers(LOADING)} loading, nothing committed yet"
            return None
        if watcher.new_rows < self.rows:
            return None
        if self.kind == COMMIT:
            if watcher.grew:
                return f"just after a fold into index/, {watcher.rows} committed"
            return None
        # RENDER: a unit in flight since the last commit, its outputs partly stored
        if watcher.changed or not watcher.workers(RENDERING):
            return None
        stored = watcher.unindexed_outputs()
        if stored:
            return f"unit in flight, {stored} output(s) stored not committed, {watcher.rows} committed"
        return None


# How a plan divides its kills among the points: the startup points are cheap (no model loads
# before them) and the render and commit points make progress, so every point is covered at a cost.
SHARES = {LAUNCH: 0.1, SCANNED: 0.1, STARTING: 0.2, RENDER: 0.3, COMMIT: 0.3}


@dataclass
class KillPlan:
    """The points of a job's kills, in a random order: of every ten, one before the driver prints,
    one once it has printed, two while its workers start, three mid-render and three just after a
    commit (a plan of five kills or more strikes every kind at least once); each RENDER or COMMIT
    kill after 1..`max_rows` rows of its attempt."""

    points: list[KillPoint] = field(default_factory=list)

    @classmethod
    def random(cls, kills: int, rng: random.Random, max_rows: int = 3) -> KillPlan:
        # With a kill for every kind, one each first; the rest in the shares.
        each = 1 if kills >= len(SHARES) else 0
        rest = kills - each * len(SHARES)
        counts = {kind: each + int(rest * share) for kind, share in SHARES.items()}
        # What rounding left over goes to the kinds with the largest remainders, render first.
        leftover = sorted(SHARES, key=lambda kind: ((rest * SHARES[kind]) % 1, SHARES[kind]), reverse=True)
        for kind in leftover[: kills - sum(counts.values())]:
            counts[kind] += 1
        points = [
            KillPoint(kind, rng.randint(1, max_rows) if kind in (RENDER, COMMIT) else 0)
            for kind, n in counts.items()
            for _ in range(n)
        ]
        rng.shuffle(points)
        return cls(points)

    def rows_needed(self, rows_per_commit: int, rows_per_fold: int | None = None) -> int:
        """Rows the job must hold for every kill to land, when one commit holds at most
        `rows_per_commit` rows and one fold into index/ `rows_per_fold` (default: as many): a
        RENDER kill after N rows strikes at the latest one commit later, a COMMIT kill one fold."""
        later = {RENDER: rows_per_commit, COMMIT: rows_per_commit if rows_per_fold is None else rows_per_fold}
        return sum(p.rows + later[p.kind] for p in self.points if p.kind in later) + 1
