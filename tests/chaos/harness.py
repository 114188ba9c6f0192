"""The pieces every chaos scenario is built from: the audit of OUT, an S3-compatible server, and
a driver killer. None of it needs pytest, so `python -m tests.chaos.report` can use it as is.

A scenario injects faults into real `python -m cogdist render` runs, lets the same command
finish, and then `audit`s OUT as a user of the dataset would see it. Its result is an
`Outcome`: one row of the table in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cogdist.sink.naming import OUTPUTS, output_path
from cogdist.storage import TEMP_SUFFIX, Location, open_location
from tests.chaos.progress import (
    KillPlan,
    Watcher,
    count_rows,
    session_processes,
)

ROOT = Path(__file__).resolve().parents[2]
INDEX, FAILURES, QUARANTINE = "index", "failures", "_cogdist/quarantine"
S3_KEY = "cogdist-chaos-key"
S3_SECRET = "cogdist-chaos-secret-do-not-log"
SHOWN = 8  # examples listed per kind of problem


MODEL = "tiny-cogview4"
# Sized so that a render takes a few seconds after startup (tiny CogView4, 64x64, 24 steps: about
# RATE rows/s on 2 cores with 2 replicas), so kills land while rows are being rendered and
# committed, each attempt adds a few rows, and rows remain after every planned kill.
STEPS = 24
SIZE = 64
REPLICAS = 2
RATE = 10.0
"""Rows/s of `render_command` on the 2-core machine the scenarios were sized on."""
COMMIT_INTERVAL = 0.25
"""Seconds between the driver's commits: short, so that a kill after N rows of an attempt
strikes within a few rows of N even on a machine several times faster."""
INDEX_INTERVAL = 0.5
"""The most seconds between folds of the journal into index/ (COMMIT kills strike just after one):
short, for the same reason."""
FASTEST = 4.0
"""The scenarios keep enough rows for every planned fault to land on machines up to this many
times faster than the one they were sized on (and any slower one)."""


def rows_per_commit(speed: float = FASTEST) -> int:
    """The most rows one commit of `render_command` holds on a machine `speed` times as fast."""
    return math.ceil(speed * RATE * COMMIT_INTERVAL)


def rows_per_fold(speed: float = FASTEST) -> int:
    """... and the most one fold of its journal into index/ holds."""
    return math.ceil(speed * RATE * max(COMMIT_INTERVAL, INDEX_INTERVAL))


def render_command(manifest: Path, out: str, *flags: str, steps: int = STEPS) -> list[str]:
    """`python -m cogdist render` of the chaos model, with progress on: the driver's first line
    is a point some kills wait for."""
    return [
        sys.executable,
        "-m",
        "cogdist",
        "render",
        str(manifest),
        "--model",
        MODEL,
        "--out",
        out,
        "--steps",
        str(steps),
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--replicas",
        str(REPLICAS),
        "--commit-interval",
        str(COMMIT_INTERVAL),
        "--index-interval",
        str(INDEX_INTERVAL),
        *flags,
    ]


def chaos_manifest(path: Path, rows: int) -> tuple[Path, set[str]]:
    """`rows` rows with ids that exercise naming (slashes, spaces, unicode) and varied prompts."""
    ids = [f"chaos/{i:04d}" if i % 10 else f"chaos/odd id {i} ünï" for i in range(rows)]
    records = [{"id": id_, "prompt": f"scene {i} " + "lorem " * (i % 7)} for i, id_ in enumerate(ids)]
    return write_manifest(path, records), set(ids)


# -- results ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One scenario's result: one row of the reliability table."""

    scenario: str  # registry name, e.g. "driver-kills-local"
    injected: str  # what was done to the job, in words
    times: int  # injections actually made (a run that ended before its kill is not one)
    expected: int  # rows that should be in the index at the end
    indexed: int  # distinct manifest ids in the index
    duplicates: int  # index rows beyond one per id
    lost: int  # manifest ids neither indexed nor recorded under failures/
    failed: int  # distinct ids recorded under failures/
    problems: list[str] = field(default_factory=list)  # every audit or harness problem
    seconds: float = 0.0  # wall time of the whole scenario
    notes: str = ""  # how the injections went (moments, progress), free text

    @property
    def ok(self) -> bool:
        return not self.duplicates and not self.lost and not self.problems and self.indexed == self.expected

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict) -> Outcome:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        head = (
            f"{self.scenario}: {'pass' if self.ok else 'FAIL'} — {self.times} x {self.injected}; "
            f"{self.indexed}/{self.expected} indexed, {self.duplicates} duplicates, {self.lost} lost, "
            f"{self.failed} failed rows recorded, {self.seconds:.0f}s"
        )
        lines = [head] + ([f"  notes: {self.notes}"] if self.notes else [])
        return "\n".join(lines + [f"  problem: {p}" for p in self.problems])


@dataclass
class Audit:
    """What `audit` found in OUT; see its docstring for the rules."""

    expected: int
    indexed: int
    duplicates: int
    lost: int
    failed: int
    problems: list[str]
    notes: list[str]

    def outcome(self, scenario: str, injected: str, times: int, seconds: float, notes: str = "") -> Outcome:
        return Outcome(
            scenario=scenario,
            injected=injected,
            times=times,
            expected=self.expected,
            indexed=self.indexed,
            duplicates=self.duplicates,
            lost=self.lost,
            failed=self.failed,
            problems=list(self.problems),
            seconds=round(seconds, 1),
            notes="; ".join([notes, *self.notes] if notes else self.notes),
        )


# -- the audit -------------------------------------------------------------------------------


def audit(out_uri: str, manifest_ids: set[str], expected_failed: Iterable[str] = frozenset()) -> Audit:
    """Check OUT (a local folder or any URI `cogdist.storage.open_location` opens) after a job.

    The storage's credentials and endpoint come from the environment (see `patched_environ`).

    Counts:
    - expected: manifest ids that should end up indexed, i.e. all but `expected_failed`;
    - indexed: distinct manifest ids in the index; duplicates: index rows beyond one per id;
    - failed: distinct ids under failures/;
    - lost: manifest ids neither indexed nor recorded under failures/.

    Problems (each one a string; any makes the outcome fail):
    - the index (or failures/) cannot be read as one dataset; an indexed id not in the manifest;
    - an id of `expected_failed` that is indexed, or not recorded under failures/; an id not in
      `expected_failed` that is recorded under failures/ and not indexed (an unexpected
      failure). An id both recorded as failed and indexed is fine unless it was expected to
      fail (a later `--retry-failed` run may have rendered it);
    - an index row whose `path` is empty or missing under OUT (an index row without output);
      an output that does not decode (images with Pillow, `.mp4` with imageio-ffmpeg), whose
      size differs from the row's width/height, or, for videos, whose frame count differs from
      `num_frames`; a `frames_path` folder that lacks `num_frames` decodable PNGs;
    - where the index has `bytes` / `sha256` columns (non-null), a stored object whose size or
      SHA-256 differs;
    - an orphan: a file under OUT/outputs (recursively) that is neither an indexed row's `path`
      nor inside its `frames_path` folder, unless it is named after an id recorded under
      failures/ (a failed row may leave its attempt behind);
    - a temporary file anywhere under OUT: a name starting with '.' and ending in '.tmp'.

    Notes (informational): parts moved to _cogdist/quarantine, ids both failed and indexed.
    """
    expected_failed = set(expected_failed)
    location = open_location(out_uri)
    problems: list[str] = []
    notes: list[str] = []
    files = _files(location, problems)

    index = _table(location, INDEX, problems)
    failures = _table(location, FAILURES, problems)
    ids = [str(i) for i in index.column("id").to_pylist()] if index is not None else []
    failed_ids = {str(i) for i in failures.column("id").to_pylist()} if failures is not None else set()

    counts = Counter(ids)
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    _report(problems, "id indexed more than once", [f"{i!r} x{counts[i]}" for i in duplicated])
    _report(problems, "indexed id not in the manifest", sorted(set(counts) - manifest_ids))
    indexed = set(counts) & manifest_ids
    _report(problems, "expected to fail but indexed", sorted(expected_failed & indexed))
    _report(
        problems, "expected to fail but not recorded under failures/", sorted(expected_failed - failed_ids)
    )
    _report(
        problems,
        "recorded under failures/ and not indexed, unexpectedly",
        sorted((failed_ids & manifest_ids) - indexed - expected_failed),
    )
    both = (failed_ids & indexed) - expected_failed
    if both:
        notes.append(f"{len(both)} ids both recorded as failed and indexed")
    lost = sorted(manifest_ids - indexed - failed_ids)
    _report(problems, "lost (neither indexed nor recorded as failed)", lost)

    rows = index.to_pylist() if index is not None else []
    _check_outputs(location, rows, files, problems)
    _check_orphans(rows, failed_ids, files, problems)
    temporary = sorted(
        rel for rel in files if rel.rsplit("/", 1)[-1].startswith(".") and rel.endswith(TEMP_SUFFIX)
    )
    _report(problems, "temporary file left under OUT", temporary)
    quarantined = [rel for rel in files if rel.startswith(QUARANTINE + "/")]
    if quarantined:
        notes.append(f"{len(quarantined)} unreadable parts quarantined: {', '.join(quarantined[:SHOWN])}")

    return Audit(
        expected=len(manifest_ids - expected_failed),
        indexed=len(indexed),
        duplicates=len(ids) - len(counts),
        lost=len(lost),
        failed=len(failed_ids),
        problems=problems,
        notes=notes,
    )


def _report(problems: list[str], kind: str, items: list[str]) -> None:
    if items:
        shown = ", ".join(str(i) for i in items[:SHOWN])
        more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
        problems.append(f"{kind} ({len(items)}): {shown}{more}")


def _files(location: Location, problems: list[str]) -> dict[str, int]:
    """Every file under OUT, recursively: path relative to OUT -> size."""
    selector = pafs.FileSelector(location.root, recursive=True, allow_not_found=True)
    try:
        infos = location.fs.get_file_info(selector)
    except OSError as e:
        problems.append(f"cannot list OUT: {e}")
        return {}
    prefix = location.root.rstrip("/") + "/"
    return {
        info.path[len(prefix) :]: info.size
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(prefix)
    }


def _table(location: Location, folder: str, problems: list[str]) -> pa.Table | None:
    """OUT/folder read the way a user reads it: `pyarrow.dataset.dataset(OUT/folder)`."""
    if location.fs.get_file_info(location.path(folder)).type == pafs.FileType.NotFound:
        return None
    try:
        return ds.dataset(location.path(folder), filesystem=location.fs, format="parquet").to_table()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        problems.append(f"{folder}/ cannot be read as one dataset: {e}")
        return None


def _check_outputs(location: Location, rows: list[dict], files: dict[str, int], problems: list[str]) -> None:
    missing, undecodable, mismatched, frames_bad = [], [], [], []
    for row in rows:
        rel, name = row.get("path"), repr(row.get("id"))
        if not rel or rel not in files:
            missing.append(f"{name} -> {rel!r}")
            continue
        try:
            data = location.read_bytes(rel)
        except Exception as e:  # any read error is a finding, not a crash
            undecodable.append(f"{name} {rel}: unreadable: {e}")
            continue
        if row.get("bytes") is not None and row["bytes"] != len(data):
            mismatched.append(f"{name} {rel}: {len(data)} bytes stored, index says {row['bytes']}")
        if row.get("sha256") is not None and row["sha256"] != hashlib.sha256(data).hexdigest():
            mismatched.append(f"{name} {rel}: sha256 differs from the index")
        try:
            width, height, frames = decode(rel, data)
        except Exception as e:
            undecodable.append(f"{name} {rel}: {type(e).__name__}: {e}")
            continue
        if (width, height) != (row.get("width"), row.get("height")):
            mismatched.append(
                f"{name} {rel}: {width}x{height}, index says {row.get('width')}x{row.get('height')}"
            )
        if frames is not None and frames != row.get("num_frames"):
            mismatched.append(f"{name} {rel}: {frames} frames, index says {row.get('num_frames')}")
        if row.get("frames_path"):
            problem = _check_frames(location, row, files)
            if problem:
                frames_bad.append(f"{name}: {problem}")
    _report(problems, "index row without its output", missing)
    _report(problems, "output does not decode", undecodable)
    _report(problems, "output differs from its index row", mismatched)
    _report(problems, "frames folder incomplete", frames_bad)


def decode(rel: str, data: bytes) -> tuple[int, int, int | None]:
    """(width, height, frames or None for an image) of an output, decoding every pixel."""
    if rel.endswith(".mp4"):
        import imageio_ffmpeg

        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(data)
            f.flush()
            reader = imageio_ffmpeg.read_frames(f.name)
            meta = next(reader)
            frames = sum(1 for _ in reader)
        width, height = meta["size"]
        return width, height, frames
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.width, image.height, None


def _check_frames(location: Location, row: dict, files: dict[str, int]) -> str:
    folder = row["frames_path"].rstrip("/") + "/"
    pngs = sorted(rel for rel in files if rel.startswith(folder) and rel.endswith(".png"))
    if len(pngs) != row.get("num_frames"):
        return f"{len(pngs)} PNGs in {folder}, num_frames {row.get('num_frames')}"
    try:
        width, height, _ = decode(pngs[0], location.read_bytes(pngs[0])) if pngs else (None, None, None)
    except Exception as e:
        return f"{pngs[0]}: {e}"
    if pngs and (width, height) != (row.get("width"), row.get("height")):
        return f"{pngs[0]} is {width}x{height}"
    return ""


def _check_orphans(
    rows: list[dict], failed_ids: set[str], files: dict[str, int], problems: list[str]
) -> None:
    owned = {row["path"] for row in rows if row.get("path")}
    folders = tuple(row["frames_path"].rstrip("/") + "/" for row in rows if row.get("frames_path"))
    # output_path(id, "") is "outputs/<h2>/<slug>_<h20>.": every name a failed id can leave.
    excused = tuple(output_path(i, "") for i in failed_ids)
    orphans = sorted(
        rel
        for rel in files
        if rel.startswith(OUTPUTS + "/")
        and rel not in owned
        and not rel.startswith(folders)
        and not rel.startswith(excused)
        and not (rel.rsplit("/", 1)[-1].startswith(".") and rel.endswith(TEMP_SUFFIX))  # reported apart
    )
    _report(problems, "orphan output (no index row owns it)", orphans)


# -- manifests -------------------------------------------------------------------------------


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# -- an S3-compatible server -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """moto's standalone S3 server on 127.0.0.1; yields the environment variables that point
    boto3, pyarrow and cogdist at it. It leaves os.environ alone (see `patched_environ`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_for_port(port, 30):
            raise RuntimeError("moto server did not start within 30 s")
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_bucket(env: dict[str, str], name: str) -> None:
    """Create a bucket on the server `env` points at, through boto3 as a user would."""
    _s3_client(env).create_bucket(Bucket=name)


def incomplete_uploads(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Keys of multipart uploads started and never completed nor aborted (what a killed
    uploader leaves: invisible to readers, but stored, and billed on AWS until aborted)."""
    listing = _s3_client(env).list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def _s3_client(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


@contextlib.contextmanager
def patched_environ(env: dict[str, str] | None) -> Iterator[None]:
    """os.environ with `env` added, for code in this process that reads the storage's settings
    from the environment (`open_location`, hence `audit`); restored afterwards."""
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def watched_location(out_uri: str, env: dict[str, str] | None) -> Location:
    """OUT as this process watches it while jobs run with `env`: the credentials go into the
    URI, since pyarrow's S3 client looks them up in os.environ on every request and this
    process's environment has none (requests would go anonymous; moto refuses some of those)."""
    env = env or {}
    if out_uri.startswith("s3://") and "AWS_ACCESS_KEY_ID" in env:
        keys = f"{quote(env['AWS_ACCESS_KEY_ID'], safe='')}:{quote(env['AWS_SECRET_ACCESS_KEY'], safe='')}"
        out_uri = f"s3://{keys}@{out_uri.removeprefix('s3://')}"
    with patched_environ(env):
        return open_location(out_uri)


# -- killing drivers -------------------------------------------------------------------------


def settle_session(sid: int, grace: float) -> tuple[float, list[str]]:
    """Wait up to `grace` seconds for every process of session `sid` to exit, then SIGKILL what
    is left. Returns (seconds waited, descriptions of the leftovers)."""
    started = time.monotonic()
    while session_processes(sid) and time.monotonic() - started < grace:
        time.sleep(0.25)
    waited = time.monotonic() - started
    leftovers = []
    for process in session_processes(sid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            leftovers.append(f"pid {process.pid} {process.name()} ({' '.join(process.cmdline())[:100]})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    return waited, leftovers


@dataclass
class KillRecord:
    """What `kill_repeatedly` did. The i-th kill aimed at `points[i]` and struck where `seen[i]`
    says, `moments[i]` seconds after that attempt's launch; `rows[i]` rows were indexed after it."""

    points: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    moments: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    settle_seconds: list[float] = field(default_factory=list)  # until the killed session was empty
    early_exits: list[str] = field(default_factory=list)  # attempts that ended before their kill
    problems: list[str] = field(default_factory=list)  # leftovers, stalls, a failed final run
    final_returncode: int | None = None
    final_seconds: float = 0.0
    final_output: str = ""  # the final run's last lines

    @property
    def kills(self) -> int:
        return len(self.points)

    def summary(self) -> str:
        kinds = Counter(p.split("+")[0] for p in self.points)
        each = "; ".join(
            f"{point} ({seen}; {moment:.1f}s, {rows} indexed after)"
            for point, seen, moment, rows in zip(self.points, self.seen, self.moments, self.rows)
        )
        parts = [
            f"{self.kills} kills ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}): {each}",
            f"killed sessions emptied in ≤{max(self.settle_seconds, default=0):.1f}s",
        ]
        if self.early_exits:
            parts.append(f"runs that ended before their kill: {', '.join(self.early_exits)}")
        parts.append(f"final run exit {self.final_returncode} in {self.final_seconds:.1f}s")
        return "; ".join(parts)


def kill_repeatedly(
    command: list[str],
    out_uri: str,
    plan: KillPlan,
    env: dict[str, str] | None = None,
    *,
    logs: Path | None = None,
    grace: float = 10.0,
    stall: float = 300.0,
    final_timeout: float = 600.0,
    total_rows: int | None = None,
    say: Callable[[str], None] = print,
) -> KillRecord:
    """Run `command` (a render driver) again and again, each time in a session of its own, and
    SIGKILL the driver at the next point of `plan` (see `progress.KillPoint`), until every point
    has had its kill; then run it once more to completion.

    Each point is a state of the job's progress, watched from outside (`progress.Watcher`): before
    the driver prints, once it has printed (the job record written, Ray starting), once worker
    actors exist, mid-render after N rows of the attempt, just after a commit after N rows.
    With `total_rows` (the manifest's size), an attempt is also killed as soon as it has indexed
    more than its share of the rows left, (left) / (kills left + 1), so rows remain for every
    planned kill however fast the machine renders. An attempt that ends on its own before its
    point is not a kill: it is noted, and attempts go on while rows remain (a run that exits 0
    has rendered every row, so it stops there).

    After each kill every process of the session must exit within `grace` seconds (Ray's agents
    outlive a killed driver unless cogdist reaps them); leftovers are SIGKILLed and recorded as
    problems. The same applies after the final run, which must exit 0. `stall` bounds an attempt
    that makes no progress at all (a hang is a finding, not a wait forever).
    The driver gets os.environ plus `env`; its output goes to `logs`/attempt-NN.log.
    """
    logs = logs or Path(tempfile.mkdtemp(prefix="chaos-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    run_env = {**os.environ, **(env or {})}
    location = watched_location(out_uri, env)
    record = KillRecord()
    kills = len(plan.points)
    attempt = 0
    while record.kills < kills and attempt < 3 * kills:
        attempt += 1
        point = plan.points[record.kills]
        log = logs / f"attempt-{attempt:02d}.log"
        watcher = Watcher(location, log=log)
        share = max(1, (total_rows - watcher.rows) // (kills - record.kills + 1)) if total_rows else None
        started = time.monotonic()
        with open(log, "wb") as sink:
            driver = subprocess.Popen(
                command, cwd=ROOT, env=run_env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
            )
        watcher.sid = sid = os.getsid(driver.pid)
        seen, last_progress = None, started
        while (exited := driver.poll()) is None:
            watcher.look()
            if watcher.changed:
                last_progress = time.monotonic()
            seen = point.reached(watcher)
            if seen is None and share is not None and watcher.new_rows >= share:
                seen = f"its share of {share} rows indexed first ({watcher.rows} indexed)"
            if seen is None and time.monotonic() - last_progress > stall:
                record.problems.append(f"attempt {attempt}: no commit within {stall:.0f}s ({log})")
                seen = "stalled"
            if seen is not None:
                break
            time.sleep(watcher.poll_seconds)
        moment = time.monotonic() - started
        if exited is not None:
            record.early_exits.append(
                f"attempt {attempt} ({point.describe()}) exit {exited} after {watcher.rows} rows"
            )
            say(f"  attempt {attempt}: ended by itself (exit {exited}) before its {point.describe()} kill")
            _settle(sid, grace, f"attempt {attempt} (exit {exited})", record)
            if exited == 0:
                break  # every row is indexed: nothing left to kill
            continue
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        record.points.append(point.describe())
        record.seen.append(seen)
        record.moments.append(round(moment, 2))
        record.rows.append(count_rows(location))
        # Exactly once at every moment, not only at the end: index/ as a user reads it now.
        index = _table(location, INDEX, record.problems)
        shown = Counter(index.column("id").to_pylist()) if index is not None else Counter()
        if twice := sorted(str(i) for i, n in shown.items() if n > 1):
            record.problems.append(f"kill {record.kills}: index/ shows ids twice: {twice[:5]}")
        record.settle_seconds.append(round(_settle(sid, grace, f"kill {record.kills}", record), 1))
        say(f"  kill {record.kills}/{kills}: {point.describe()} ({seen}) at {moment:.1f}s")

    started = time.monotonic()
    log = logs / "final.log"
    with open(log, "wb") as sink:
        driver = subprocess.Popen(
            command, cwd=ROOT, env=run_env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
        )
    sid = os.getsid(driver.pid)
    try:
        record.final_returncode = driver.wait(timeout=final_timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        record.final_returncode = driver.wait()
        record.problems.append(f"the final run did not finish within {final_timeout:.0f}s")
    record.final_seconds = round(time.monotonic() - started, 1)
    _settle(sid, grace, "the final run", record)
    record.final_output = "\n".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    if record.final_returncode != 0:
        record.problems.append(f"the final run exited {record.final_returncode}: {record.final_output}")
    say(f"  final run: exit {record.final_returncode} in {record.final_seconds:.1f}s")
    return record


def _settle(sid: int, grace: float, what: str, record: KillRecord) -> float:
    waited, leftovers = settle_session(sid, grace)
    if leftovers:
        record.problems.append(
            f"{what}: processes alive {grace:.0f}s after the driver: {'; '.join(leftovers)}"
        )
    return waited
