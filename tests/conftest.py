"""Shared test fixtures: one Ray instance per session, an S3-compatible server, tiny models."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.chaos.harness import free_port, wait_for_port  # noqa: F401  (used by tests)

# The tests never reach the Hugging Face Hub (there is no network here): a lookup fails at once
# instead of after a network timeout. Set before huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inductor compiles in one thread: on 2 busy cores its pool of compile subprocesses (each
# importing torch, alive for the process's life) costs more CPU than it saves. Every process of
# the suite inherits it: render subprocesses, Ray's workers, the shared head's.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

# What the suite needs beyond cogdist itself: the `test` extra's packages (by import name) and
# the Chromium that tests/test_report.py drives; .ci/run installs both.
TEST_EXTRA = {
    "pytest_timeout": "pytest-timeout",
    "hypothesis": "hypothesis",
    "moto": "moto[server]",
    "boto3": "boto3",
    "jsonschema": "jsonschema",
    "yaml": "pyyaml",
    "datasets": "datasets",
    "torchao": "torchao",
}


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run, naming what is missing, rather than fail or skip tests one by one."""
    missing = [package for module, package in TEST_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError(
            f"the tests need the test extra, and {', '.join(missing)} is missing: "
            'run `pip install -e ".[test]"` (.ci/run installs everything the tests need)'
        )
    if not hasattr(config, "workerinput"):  # once, in the process that starts the test processes
        ensure_ray_auth_token()


def ensure_ray_auth_token() -> None:
    """Ray 2.60 turns token auth on for every new local Ray and writes ~/.ray/auth_token if it is
    missing, with a plain overwrite: on a fresh machine the suite's parallel Ray starts could each
    write their own token and leave a cluster whose token is not the file's. One token, first."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    ray = Path(sys.executable).with_name("ray")
    made = subprocess.run([str(ray), "get-auth-token", "--generate"], capture_output=True, text=True)
    if made.returncode != 0:
        raise pytest.UsageError(f"`ray get-auth-token --generate` failed: {made.stderr[-500:]}")


DEMO = ROOT / "manifests" / "demo.parquet"

S3_KEY = "cogdist-test-key"
S3_SECRET = "cogdist-test-secret-do-not-log"


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist takes its columns from the first row alone
        names = list(dict.fromkeys(name for row in rows for name in row))
        rows = [{name: row.get(name) for name in names} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory):
    """One local Ray instance for every in-process test of the session.

    Started after the S3 server so that its workers hold the store's credentials in their
    environment, as the nodes of a real cluster would; but not its endpoint, which the driver
    must hand to the workers itself.
    """
    import ray

    ray.init(
        address="local",  # never a cluster some `ray start` left behind (tests/test_cluster.py makes one)
        num_cpus=4,
        include_dashboard=False,
        logging_level="WARNING",
        # --compile's inductor cache: the session's own, cold, not the user's ~/.cache.
        runtime_env={
            "env_vars": {
                "AWS_ENDPOINT_URL": "",
                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor")),
            }
        },
        # Metrics reach the node's Prometheus endpoint within a second, not ten (test_observability).
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3-compatible server on 127.0.0.1; yields its environment variables."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not wait_for_port(port, 30):
        process.kill()
        raise RuntimeError(
            f"moto's S3 server did not start on 127.0.0.1:{port} within 30 s: the tests need a free "
            "loopback port and moto[server] (the test extra)"
        )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    process.terminate()
    process.wait(timeout=10)


_bucket_counter = iter(range(10_000))


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the test server (created through boto3, as a user would)."""
    import boto3

    name = f"cogdist-test-{next(_bucket_counter)}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny CogView4 pipeline saved with save_pretrained, to load through from_pretrained."""
    from cogdist.models.cogview4.runner import build_tiny

    folder = tmp_path_factory.mktemp("models") / "tiny-cogview4"
    build_tiny(0).save_pretrained(folder, safe_serialization=True)
    return folder


_heads = contextlib.ExitStack()
_shared_head = None


def shared_ray_address() -> str:
    """The address of this test process's Ray head (`ray start --head`, token auth, as many CPUs
    as the machine, as the embedded instance has), started on first use. Its nodes hold the test
    store's credentials, as a real cluster's would, but not its endpoint: the driver names it."""
    global _shared_head
    if _shared_head is None:
        from tests.ray_head import ray_head

        nodes = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        nodes.update(
            AWS_ACCESS_KEY_ID=S3_KEY,
            AWS_SECRET_ACCESS_KEY=S3_SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        _shared_head = _heads.enter_context(ray_head(os.cpu_count() or 1, dashboard=False, env=nodes))
    return _shared_head.address


def pytest_sessionfinish(session: pytest.Session) -> None:
    _heads.close()  # in each test process: its shared head, if it started one


def driver_env(env: dict | None = None, *, own_ray: bool = False) -> dict[str, str]:
    """The environment of a render driver subprocess: os.environ and `env`, joining this test
    process's shared Ray head unless `own_ray` (the driver starts its embedded instance)."""
    joined = {} if own_ray else {"RAY_ADDRESS": shared_ray_address(), "RAY_AUTH_MODE": "token"}
    return {**os.environ, **joined, **(env or {})}


def cli(
    *args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None, own_ray: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m cogdist ARGS` in a subprocess, as a user would. A render joins the test
    process's shared Ray head (see `driver_env`) unless `own_ray`, or `env` names a cluster."""
    # Only a render starts Ray, and one that names its cluster joins that one.
    joins = (
        bool(args) and args[0] == "render" and "--address" not in args and "RAY_ADDRESS" not in (env or {})
    )
    return subprocess.run(
        [sys.executable, "-m", "cogdist", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=driver_env(env, own_ray=own_ray or not joins),
        cwd=cwd or ROOT,
    )


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def reap_session(sid: int) -> None:
    """Kill whatever is left of a session (a safety net after the assertions)."""
    for process in session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def read_table(out: str, folder: str = "index"):
    """(table, location) of the Parquet parts under OUT/folder, as any reader of OUT sees them."""
    from cogdist.storage import open_location

    location = open_location(out)
    return ds.dataset(location.path(folder), filesystem=location.fs).to_table(), location


def committed_rows(out: str) -> int:
    """Rows a resume of OUT would not render again: in index/ or its journal."""
    from cogdist.sink.journal import done_ids
    from cogdist.storage import open_location

    try:
        return len(done_ids(open_location(out)))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def probe_mp4(path) -> tuple[dict, np.ndarray]:
    """Decode an MP4 file with ffmpeg: its metadata and every frame (frames, height, width, 3)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader])
    return meta, frames


def kill_after_first_commit(command: list[str], out: str, env: dict[str, str] | None = None) -> int:
    """Start a render driver in a session of its own, SIGKILL it once OUT's index has rows, and
    check that nothing of it outlives it (the reaper ends Ray's lingering agents too).
    Returns the rows committed before the kill."""
    kill_driver_when(command, lambda: committed_rows(out) > 0, env=env)
    return committed_rows(out)


def kill_driver_when(
    command: list[str], ready, seconds: float = 300, env: dict[str, str] | None = None
) -> None:
    """Start a render driver in a session of its own, SIGKILL it as soon as `ready()` (a point of
    the job's progress, such as rows in the index) is true, and check that nothing of it outlives
    it. `seconds` only bounds a job that never gets there (a hang), it never chooses the moment.
    The driver's environment is `env` (os.environ by default: its own embedded Ray)."""
    driver = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sid = os.getsid(driver.pid)
    try:
        deadline = time.monotonic() + seconds
        while not ready() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
        assert driver.poll() is None, "the render finished before its kill point: give the job more rows"
        assert ready(), f"the job did not reach its kill point within {seconds}s"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 30
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = [(p.pid, p.name()) for p in session_processes(sid)]
        assert leftovers == [], f"processes left behind by the killed driver: {leftovers}"
    finally:
        reap_session(sid)
