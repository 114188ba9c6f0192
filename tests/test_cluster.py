"""Joining an existing Ray cluster: a head started with `ray start` on loopback, and --address;
submitting the jobs/ entry points to it with `ray job submit`, and a Python driver joining it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import (
    ROOT,
    cli,
    free_port,
    reap_session,
    wait_for_port,
    write_manifest,
)

# One test process starts the module's Ray head and runs every test that joins it.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray-head")]

RAY = Path(sys.executable).with_name("ray")
# Token auth on, as users' clusters have it (Ray 2.60): the head and every client read the
# token from ~/.ray/auth_token, which conftest makes sure exists.
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}
RAY_ENV = {**os.environ, **TOKEN_AUTH}
FAST = ["--width", "64", "--height", "64", "--steps", "2"]


@dataclass(frozen=True)
class Head:
    address: str  # GCS, for drivers: HOST:PORT
    dashboard: str  # job server, for `ray job`: http://HOST:PORT


def ray_status(address: str) -> subprocess.CompletedProcess:
    """`ray status` against the test cluster, sending its token."""
    return subprocess.run(
        [str(RAY), "status", "--address", address], capture_output=True, text=True, timeout=120, env=RAY_ENV
    )


@pytest.fixture(scope="module")
def ray_head():
    port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: it holds Unix sockets
    # The venv's bin first on PATH, as on a node whose image has cogdist's Python: a submitted
    # entry point `python jobs/render.py` finds the interpreter the head runs.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            # The dashboard holds the job server `ray job submit` talks to. Free ports for it, its
            # agent and the client server: other test runs may have a head on this machine.
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--ray-client-server-port",
            str(client_port),
            "--disable-usage-stats",
            # A temp dir of its own: a submitted job's driver finds its cluster as Ray's "auto"
            # (the job supervisor resolves it from TEMP_DIR/ray_current_cluster), which in the
            # shared /tmp/ray names whichever Ray another test process started last.
            "--temp-dir",
            temp_dir,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**RAY_ENV, "PATH": path},
    )
    address = f"127.0.0.1:{port}"
    # `ray status` blocks for a long time while GCS is not up: wait for its ports first (the
    # job server hands jobs to the head's agent).
    for name, listening in (("GCS", port), ("dashboard", dashboard_port), ("agent", agent_port)):
        if not wait_for_port(listening, 60):
            reap_session(os.getsid(head.pid))
            raise RuntimeError(
                f"`ray start --head` did not open its {name} port 127.0.0.1:{listening} within 60 s: "
                "the test needs free loopback ports (Ray's workers also take 10002-19999)"
            )
    for _ in range(20):  # GCS answers before the cluster is fully up
        probe = ray_status(address)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        reap_session(os.getsid(head.pid))
        raise RuntimeError(f"ray head did not start: {probe.stderr[-500:]}")
    yield Head(address, f"http://127.0.0.1:{dashboard_port}")
    sid = os.getsid(head.pid)
    # SIGTERM to `ray start --block` alone: it stops its processes in ~5 s. Sent to the whole
    # session, it hangs among its killed children until the reaper below.
    head.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=20)
    reap_session(sid)  # what outlives the head (the jobs' workers): SIGKILL
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_render_joins_a_running_cluster_and_leaves_it_running(tmp_path, ray_head):
    manifest = write_manifest(
        tmp_path / "m.parquet", [{"id": f"c{i}", "prompt": "on a cluster"} for i in range(4)]
    )
    out = tmp_path / "out"
    result = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-cogview4",
        "--out",
        str(out),
        "--address",
        ray_head.address,
        "--replicas",
        "2",
        env=TOKEN_AUTH,
    )
    assert result.returncode == 0, result.stderr
    assert "Ray joined" in result.stderr and "2 replica(s)" in result.stderr
    assert ds.dataset(str(out / "index")).to_table().num_rows == 4
    status = ray_status(ray_head.address)
    assert status.returncode == 0, "the cluster must survive a driver that joined it"
    # Token auth is on: the job server refuses a request that does not carry the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code in (401, 403), refused.value


def test_a_driver_without_the_token_is_told_how_to_authenticate(tmp_path, ray_head):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "c", "prompt": "on a cluster"}])
    env = {"RAY_AUTH_MODE": "disabled"}  # as a shell without RAY_AUTH_MODE=token: no token is sent
    result = cli("render", str(manifest), "--model", "tiny-cogview4", "--out", str(tmp_path / "out"),
                 "--address", ray_head.address, env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"the Ray cluster at {ray_head.address} refused this driver" in result.stderr
    assert "RAY_AUTH_MODE=token" in result.stderr and "ray get-auth-token" in result.stderr


def submit(head: Head, entry_point: list[str], env_vars: dict[str, str] | None = None):
    """`ray job submit` of `python ENTRY_POINT` with ROOT as the working dir. It waits for the job,
    tailing its log, and ends with the job's final status, as `ray job status` prints it.
    Returns (its exit code, its output, the job's id)."""
    job_id = f"cogdist-test-{uuid.uuid4().hex[:8]}"
    command = [str(RAY), "job", "submit", "--address", head.dashboard, "--submission-id", job_id]
    command += ["--working-dir", str(ROOT)]
    if env_vars:
        command += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    command += ["--", "python", *entry_point]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=RAY_ENV)
    return result.returncode, result.stdout + result.stderr, job_id


def job_logs(head: Head, job_id: str) -> str:
    """`ray job logs JOB_ID`, as a user reads it."""
    result = subprocess.run(
        [str(RAY), "job", "logs", "--address", head.dashboard, job_id],
        capture_output=True,
        text=True,
        timeout=60,
        env=RAY_ENV,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def uploaded_package(logs: str, command: str) -> Path:
    """The folder the job's cogdist was imported from, as its first log line names it."""
    prefix = f"cogdist job {command}: cogdist "
    line = next(line for line in logs.splitlines() if line.startswith(prefix))
    return Path(line.split(" from ", 1)[1]).parent


def test_render_job_then_status_job(tmp_path, ray_head):
    ids = [f"j{i}" for i in range(3)]
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "a submitted job"} for i in ids])
    out = tmp_path / "out"
    entry = ["jobs/render.py", str(manifest), "--model", "tiny-cogview4", "--out", str(out)]
    code, output, job_id = submit(ray_head, [*entry, "--replicas", "1", *FAST])
    assert code == 0 and f"Job '{job_id}' succeeded" in output, output[-3000:]

    table = ds.dataset(str(out / "index")).to_table()
    assert sorted(table["id"].to_pylist()) == ids  # every row, exactly once

    logs = job_logs(ray_head, job_id)
    # Ray hands a job the cluster in $RAY_ADDRESS: the render joined it, started no Ray of its own.
    assert "Ray joined" in logs
    assert "3 rendered, 0 already done, 0 failed of 3 rows in" in logs
    assert logs.rstrip().endswith("cogdist job render: succeeded (exit 0)")
    # The job ran the uploaded working dir's code, not the checkout the head's venv points to.
    package = uploaded_package(logs, "render")
    assert package.parent.name == "working_dir_files"
    assert (package / "jobs" / "render.py").read_text() == (ROOT / "jobs" / "render.py").read_text()
    # The upload leaves .git, .venv (2 GB) and what .gitignore lists behind.
    uploaded = [path for path in package.rglob("*") if path.is_file()]
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    assert not any("__pycache__" in path.parts for path in uploaded)
    assert sum(path.stat().st_size for path in uploaded) < 20 * 2**20

    # jobs/status.py as the gate of a pipeline, configured through the job's environment: one
    # manifest row is not rendered yet, so the job fails with exit code 3 (pending).
    longer = write_manifest(
        tmp_path / "longer.parquet", [{"id": i, "prompt": "a submitted job"} for i in [*ids, "j3"]]
    )
    code, output, gate_id = submit(
        ray_head, ["jobs/status.py"], env_vars={"COGDIST_OUT": str(out), "COGDIST_MANIFEST": str(longer)}
    )
    assert code != 0
    assert f"Job '{gate_id}' failed" in output and "failed with exit code 3" in output, output[-3000:]
    assert "done     3" in output and "pending  1" in output
    assert "cogdist job status: failed (exit 3)" in output
    # With the manifest that was rendered the render is complete: exit 0.
    complete = subprocess.run(
        [sys.executable, "jobs/status.py", str(out), "--manifest", str(manifest)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert complete.returncode == 0, complete.stdout + complete.stderr
    assert "pending  0" in complete.stdout


def test_a_refused_manifest_fails_the_validate_job(tmp_path, ray_head):
    manifest = write_manifest(
        tmp_path / "bad.parquet",
        [{"id": "a", "prompt": "fine"}, {"id": "b", "prompt": "odd size", "width": 63}],
    )
    code, output, job_id = submit(ray_head, ["jobs/validate.py", str(manifest), "--model", "tiny-cogview4"])
    assert code != 0
    assert f"Job '{job_id}' failed" in output and "failed with exit code 2" in output, output[-3000:]
    assert "manifest refused" in output and "column 'width' = 63" in output
    assert "cogdist job validate: failed (exit 2)" in output


def test_python_driver_joins_the_cluster(tmp_path, ray_head):
    manifest = write_manifest(
        tmp_path / "m.parquet", [{"id": f"p{i}", "prompt": "from Python"} for i in range(2)]
    )
    out = tmp_path / "out"
    driver = f"""
import json, cogdist
s = cogdist.render({str(manifest)!r}, model="tiny-cogview4", out={str(out)!r}, address={ray_head.address!r},
                   replicas=1, progress=False, width=64, height=64, steps=2)
print(json.dumps({{"done": s.done, "failed": s.failed, "ok": s.ok}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=RAY_ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"done": 2, "failed": 0, "ok": True}
    table = ds.dataset(str(out / "index")).to_table()
    assert sorted(table["id"].to_pylist()) == ["p0", "p1"]
    status = ray_status(ray_head.address)
    assert status.returncode == 0, "the cluster must survive a Python driver that joined it"
