"""`ray start --head` on loopback with token auth, as users' clusters run it (Ray 2.60): the
module head of tests/test_cluster.py, and the head each test process lends its CLI drivers
(`shared_ray_address`) so that a render subprocess joins a running cluster instead of paying
for a whole Ray start of its own. The tests of the embedded instance itself (its start, its
token warning, what a SIGKILLed driver leaves behind) keep theirs: `cli(..., own_ray=True)`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.harness import free_port, wait_for_port

RAY = Path(sys.executable).with_name("ray")
# Token auth on: the head and every client read the token from ~/.ray/auth_token, which
# conftest makes sure exists before any test process starts.
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


@dataclass(frozen=True)
class Head:
    address: str  # GCS, for drivers: HOST:PORT
    dashboard: str  # job server, for `ray job`: http://HOST:PORT ("" without a dashboard)


def ray_status(address: str) -> subprocess.CompletedProcess:
    """`ray status` against a test head, sending its token."""
    return subprocess.run(
        [str(RAY), "status", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **TOKEN_AUTH},
    )


def _reap(sid: int) -> None:
    from tests.conftest import reap_session

    reap_session(sid)


@contextlib.contextmanager
def ray_head(num_cpus: int, *, dashboard: bool, env: dict[str, str] | None = None) -> Iterator[Head]:
    """A head of `num_cpus` CPUs in a session and a temp dir of its own, stopped on exit with
    whatever its jobs left behind. `env` is the nodes' environment (os.environ by default)."""
    port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")  # short: it holds Unix sockets
    # The venv's bin first on PATH, as on a node whose image has cogdist's Python: a submitted
    # entry point `python jobs/render.py` finds the interpreter the head runs.
    base = {**(os.environ if env is None else env), **TOKEN_AUTH}
    path = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    command = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        str(num_cpus),
        # Free ports for the agent and the client server (and the dashboard, whose job server
        # `ray job submit` talks to): other test processes may have a head on this machine.
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
    ]
    if dashboard:
        command += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    else:
        command += ["--include-dashboard=false"]
    head = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**base, "PATH": path},
    )
    sid = os.getsid(head.pid)
    address = f"127.0.0.1:{port}"
    try:
        # `ray status` blocks for a long time while GCS is not up: wait for its ports first (the
        # job server hands jobs to the head's agent).
        ports = [("GCS", port), ("agent", agent_port)] + (
            [("dashboard", dashboard_port)] if dashboard else []
        )
        for name, listening in ports:
            if not wait_for_port(listening, 60):
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
            raise RuntimeError(f"ray head did not start: {probe.stderr[-500:]}")
        yield Head(address, f"http://127.0.0.1:{dashboard_port}" if dashboard else "")
    finally:
        # SIGTERM to `ray start --block` alone: it stops its processes in ~5 s. Sent to the whole
        # session, it hangs among its killed children until the reaper below.
        head.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
        _reap(sid)  # what outlives the head (the jobs' workers): SIGKILL
        shutil.rmtree(temp_dir, ignore_errors=True)
