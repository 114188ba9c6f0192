"""An S3-compatible store that goes away mid-run and comes back: moto behind a TCP relay.

moto keeps its objects in memory, so a plain restart would also lose every object, which no real
store does. `FlakyStore.outage` therefore models a restart of a store with a disk: the relay
stops accepting and cuts every open connection (clients see refused and reset connections), the
bucket is copied out of moto through its own port, moto is stopped and started again on the same
port, the copy is put back, and after the outage the relay accepts connections again. Nothing a
client acknowledged is lost; what was in flight fails and must be retried by the client.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.chaos.harness import (
    S3_KEY,
    S3_SECRET,
    STEPS,
    Outcome,
    _s3_client,
    audit,
    chaos_manifest,
    free_port,
    make_bucket,
    patched_environ,
    render_command,
    wait_for_port,
    watched_location,
)
from tests.chaos.progress import POLL_SECONDS, REMOTE_POLL_SECONDS, Watcher


class Relay:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target` while up; refuses connections while down.
    With `delay`, each request waits that long before it is passed on, as a distant store's
    round trip does (a client's bytes after the server's, or its first, begin a request)."""

    def __init__(self, target: int, delay: float = 0.0):
        self.target = target
        self.delay = delay
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Stop listening and cut every open connection, as a store going away does."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            if listener is not self._listener:
                client.close()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            turn = {"answered": True}  # the server spoke last: the client's next bytes are a request
            for a, b, request in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, request, turn), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool, turn: dict) -> None:
        try:
            while data := source.recv(65536):
                if request and turn["answered"] and self.delay:
                    time.sleep(self.delay)
                turn["answered"] = not request
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._open.discard(s)


class FlakyStore:
    """moto behind a Relay (delaying each request by `delay`). `env` points clients at the relay;
    `direct` at moto itself."""

    def __init__(self, delay: float = 0.0) -> None:
        self.moto_port = free_port()
        self.process: subprocess.Popen | None = None
        self.relay = Relay(self.moto_port, delay)
        self.outages: list[float] = []  # seconds each outage lasted

    def _env(self, port: int) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def env(self) -> dict[str, str]:
        return self._env(self.relay.port)

    @property
    def direct(self) -> dict[str, str]:
        return self._env(self.moto_port)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_for_port(self.moto_port, 30):
            raise RuntimeError("moto server did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def outage(self, until: Callable[[], bool], cap: float) -> str:
        """Make the store unreachable, restarting the server meanwhile (keeping every object it had
        acknowledged), until `until()` is true (a sign of the job's progress) or `cap` seconds have
        passed. Returns why it ended."""
        started = time.monotonic()
        self.relay.down()
        client = _s3_client(self.direct)
        saved = {}
        for bucket in client.list_buckets()["Buckets"]:
            objects = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for entry in page.get("Contents", []):
                    objects[entry["Key"]] = client.get_object(Bucket=bucket["Name"], Key=entry["Key"])[
                        "Body"
                    ].read()
            saved[bucket["Name"]] = objects
        self.stop()
        self.start()
        client = _s3_client(self.direct)
        for bucket, objects in saved.items():
            client.create_bucket(Bucket=bucket)
            for key, body in objects.items():
                client.put_object(Bucket=bucket, Key=key, Body=body)
        while not (ended := until()) and time.monotonic() - started < cap:
            time.sleep(POLL_SECONDS)
        self.relay.up()
        self.outages.append(time.monotonic() - started)
        return "as planned" if ended else f"at the {cap:.0f}s cap"


class Lines:
    """A process's text stream read into a list of lines by a thread, so a scenario can watch what
    the driver says while it runs."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def count(self, text: str, start: int = 0) -> int:
        return sum(line.count(text) for line in self.lines[start:])

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


@contextlib.contextmanager
def flaky_store(delay: float = 0.0) -> Iterator[FlakyStore]:
    store = FlakyStore(delay)
    store.start()
    store.relay.up()
    try:
        yield store
    finally:
        store.relay.down()
        store.stop()


# -- scenarios ---------------------------------------------------------------------------------


def direct_location(store: FlakyStore, out: str):
    """OUT as the test sees it: straight to moto, past the relay the job goes through, with the
    credentials in the URI (the process environment has none)."""
    return watched_location(out, store.direct)


RETRYING = "retrying for up to"  # what the driver and workers log when a read or write is retried
# Every worker line reaches the driver's output as it is: Ray folds lines that differ only in
# numbers (two workers' retries of two outputs) into one "[repeated Nx]" line, seconds later.
EVERY_LINE = {"RAY_DEDUP_LOGS": "0"}


def storage_outage(workdir: Path, rows: int = 60, outages: int = 2, steps: int = STEPS) -> Outcome:
    """The object store goes away (and restarts) mid-run, for less than --storage-timeout: writes
    are retried through it and the run completes in one go.

    Each outage starts once 5 more rows are indexed (since the start, or since the store came
    back) and lasts until the driver's output reports a new retried read or write: both points of
    the job's progress, whatever the machine's speed."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    out = "s3://chaos/outage"
    problems: list[str] = []
    with flaky_store() as store:
        make_bucket(store.env, "chaos")
        location = direct_location(store, out)
        command = render_command(manifest, out, "--storage-timeout", "120", steps=steps)
        driver = subprocess.Popen(
            command,
            env={**os.environ, **store.env, **EVERY_LINE},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said = Lines(driver.stderr)
        watcher = Watcher(location)
        at_rows, ends = [], []
        for number in range(outages):
            since = watcher.rows
            while watcher.rows < since + 5 and driver.poll() is None:
                watcher.look()
                time.sleep(REMOTE_POLL_SECONDS)
            if driver.poll() is not None:
                problems.append(f"the run ended before outage {number + 1}; use more rows")
                break
            at_rows.append(watcher.rows)
            seen = said.count(RETRYING)
            ends.append(store.outage(lambda seen=seen: said.count(RETRYING) > seen, cap=60))
            watcher.look()
        driver.wait(timeout=600)
        stderr = said.text()
        if driver.returncode != 0:
            problems.append(f"exit code {driver.returncode}: {stderr.strip().splitlines()[-1:]}")
        retried = stderr.count(RETRYING)
        with patched_environ(store.direct):
            found = audit(out, ids)
    notes = (
        f"store down {', '.join(f'{s:.0f}s' for s in store.outages)} from {at_rows} rows indexed, "
        f"each until a new retry was reported ({', '.join(ends)}); --storage-timeout 120; "
        f"{retried} reads/writes reported retrying"
    )
    outcome = found.outcome(
        "storage-outage",
        "object store stopped and restarted mid-run",
        len(store.outages),
        time.monotonic() - started,
        notes,
    )
    outcome.problems = problems + outcome.problems
    return outcome


def storage_outage_stops(workdir: Path, rows: int = 40, steps: int = STEPS) -> Outcome:
    """The store stays away longer than --storage-timeout: the run stops with a clear message,
    and the same command, run once the store is back, finishes the job.

    The outage starts once 5 rows are indexed and lasts until the driver has exited."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    out = "s3://chaos/stops"
    problems: list[str] = []
    with flaky_store() as store:
        make_bucket(store.env, "chaos")
        location = direct_location(store, out)
        command = render_command(manifest, out, "--storage-timeout", "4", steps=steps)
        env = {**os.environ, **store.env, **EVERY_LINE}
        driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = Lines(driver.stderr)
        watcher = Watcher(location)
        while watcher.rows < 5 and driver.poll() is None:
            watcher.look()
            time.sleep(REMOTE_POLL_SECONDS)
        before = watcher.rows
        if driver.poll() is not None:
            problems.append("the run ended before the outage; use more rows")
            ended = "never began"
        else:
            ended = store.outage(lambda: driver.poll() is not None, cap=120)
        driver.wait(timeout=600)
        stderr = said.text()
        message = [line for line in stderr.splitlines() if "stopped:" in line]
        if driver.returncode != 1 or not message:
            problems.append(
                f"expected exit 1 with a 'stopped:' message, got {driver.returncode}: {stderr[-500:]}"
            )
        elif "run the same command again" not in message[0]:
            problems.append(f"the message does not say how to resume: {message[0]}")
        if S3_SECRET in stderr:
            problems.append("the secret key appeared in the driver's output")
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if resumed.returncode != 0:
            problems.append(f"the resumed run exited {resumed.returncode}: {resumed.stderr[-500:]}")
        with patched_environ(store.direct):
            found = audit(out, ids)
    notes = (
        f"store down from {before} rows indexed until the driver exited ({ended}, "
        f"{store.outages[0] if store.outages else 0:.0f}s) with --storage-timeout 4; "
        f"the run stopped with: {message[0].strip()[:160] if message else '(no message)'}; "
        "the same command then completed"
    )
    outcome = found.outcome(
        "storage-outage-stops",
        "object store down longer than --storage-timeout",
        len(store.outages),
        time.monotonic() - started,
        notes,
    )
    outcome.problems = problems + outcome.problems
    return outcome
