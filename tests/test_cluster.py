"""Joining an existing Ray cluster: a head started with `ray start` on loopback, and --address;
submitting the jobs/ entry points to it with `ray job submit`, and a Python driver joining it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import ROOT, cli, write_manifest
from tests.ray_head import RAY, TOKEN_AUTH, Head, ray_status
from tests.ray_head import ray_head as start_ray_head

# One test process starts the module's Ray head and runs every test that joins it.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray-head")]

RAY_ENV = {**os.environ, **TOKEN_AUTH}
FAST = ["--width", "64", "--height", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def ray_head():
    """The module's head: 2 CPUs and the dashboard, whose job server `ray job submit` talks to."""
    with start_ray_head(2, dashboard=True) as head:
        yield head


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
