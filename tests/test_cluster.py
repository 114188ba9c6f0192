"""Joining an existing Ray cluster: a head started with `ray start` on loopback, and --address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import (
    ROOT,
    cli,
    free_port,
    reap_session,
    session_processes,
    wait_for_port,
    write_manifest,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_head():
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [
            str(ray),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A loopback test cluster: no auth token to hand around (Ray 2.60 enables token auth).
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    address = f"127.0.0.1:{port}"
    # `ray status` blocks for a long time while GCS is not up: wait for its port first.
    wait_for_port(port, 60)
    for _ in range(20):  # GCS answers before the cluster is fully up
        probe = subprocess.run(
            [str(ray), "status", "--address", address], capture_output=True, text=True, timeout=120
        )
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        reap_session(os.getsid(head.pid))
        raise RuntimeError(f"ray head did not start: {probe.stderr[-500:]}")
    yield address
    sid = os.getsid(head.pid)
    os.killpg(sid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    reap_session(sid)


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
        ray_head,
        "--replicas",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "Ray joined" in result.stderr and "2 replica(s)" in result.stderr
    assert ds.dataset(str(out / "index")).to_table().num_rows == 4
    ray = Path(sys.executable).with_name("ray")
    status = subprocess.run([str(ray), "status", "--address", ray_head], capture_output=True, text=True)
    assert status.returncode == 0, "the cluster must survive a driver that joined it"


def test_ray_address_from_the_environment(tmp_path, ray_head):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "e", "prompt": "via RAY_ADDRESS"}])
    out = tmp_path / "out"
    result = cli(
        "render",
        str(manifest),
        "--model",
        "tiny-cogview4",
        "--out",
        str(out),
        "--replicas",
        "1",
        env={"RAY_ADDRESS": ray_head},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Ray joined" in result.stderr
