"""Jobs on a fleet that changes under them, on real multi-node Ray on one machine
(`ray.cluster_utils.Cluster`: real raylets that join, drain and die): GPUs that come late, a
cluster that never gets them, a drained node and SIGINT (nodes killed and joined mid-run, and an
autoscaling cluster: tests/test_fleet_growth.py).
Every wait is for a point of the job's progress (a line it printed, rows it indexed), bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogdist.sink.journal import read_done
from cogdist.storage import open_location
from tests.chaos.fleet import fleet_command, local_cluster
from tests.conftest import ROOT, committed_rows, reap_session, write_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("fleet"), pytest.mark.timeout(900)]

RAY = Path(sys.executable).with_name("ray")
BOUND = 300.0  # seconds any one wait may take before the test fails (a bound, not a pace)
_WITH_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


@pytest.fixture(scope="session")
def fleet():
    """One cluster for the module's tests (its xdist group): a CPU-less head and one worker node
    of 1 CPU (kept). Session-scoped: a module fixture was started twice in one run when pytest-xdist
    ran another module's test between two of these."""
    with local_cluster(nodes=1) as cluster:
        yield cluster


def rows(n: int) -> list[dict]:
    return [{"id": f"f/{i:03d}", "prompt": f"fleet row {i}"} for i in range(n)]


class Job:
    """A `cogdist render` driver joined to the fleet, in a session of its own, logging to a file."""

    def __init__(self, tmp_path: Path, address: str, n: int, *flags: str, steps: int = 2, env=None):
        manifest = write_manifest(tmp_path / "m.parquet", rows(n))
        self.out = str(tmp_path / "out")
        self.log = tmp_path / "driver.log"
        command = fleet_command(manifest, self.out, address, "--commit-interval", "0.5", *flags, steps=steps)
        # SIGINT at its default in the driver, whatever this process inherited: a command started
        # in the background by a non-interactive shell (CI scripts, `cmd &`) ignores SIGINT, and a
        # Python started so never turns it into KeyboardInterrupt.
        command = [sys.executable, "-c", _WITH_SIGINT, *command]
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
            )

    def said(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, ready, every: float = 0.2) -> None:
        """Until `ready()`; `every`: seconds between looks (a look that starts a process costs ~1 s of CPU)."""
        deadline = time.monotonic() + BOUND
        while not ready():
            assert self.process.poll() is None, (
                f"the job exited {self.process.returncode} before {what}:\n{self.said()}"
            )
            assert time.monotonic() < deadline, f"no {what} within {BOUND:.0f}s:\n{self.said()}"
            time.sleep(every)

    def wait_line(self, text: str) -> None:
        self.wait_for(repr(text), lambda: text in self.said())

    def wait_rows(self, n: int) -> None:
        self.wait_for(f"{n} rows indexed", lambda: committed_rows(self.out) >= n)

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=BOUND)
        finally:
            reap_session(self.process.pid)


def live_placement_groups(address: str) -> list[str]:
    """States of the cluster's placement groups that are not removed (from a driver of its own)."""
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([g['state'] for g in ray.util.placement_group_table().values()]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [state for state in json.loads(done.stdout.strip().splitlines()[-1]) if state != "REMOVED"]


def index(out: str):
    """The committed rows (index/ and its journal, as a resume reads them)."""
    table = read_done(open_location(out))
    return table.to_pylist() if table is not None else []


def test_a_job_that_never_gets_its_gpus_stops_after_the_capacity_timeout(fleet, tmp_path):
    job = Job(tmp_path, fleet.address, 4, "--device", "gpu", "--sp", "2", "--capacity-timeout", "10")
    code = job.finish()
    said = job.said()
    assert code == 1, said
    assert "waiting for a node with 2 GPUs for a gang of --sp 2: the cluster has 0 GPUs" in said
    assert "stopped after" in said and "--capacity-timeout 10" in said
    assert committed_rows(job.out) == 0
    assert live_placement_groups(fleet.address) == []  # ended by an error: nothing left behind


def test_gpus_that_come_late_are_waited_for_and_used(fleet, tmp_path):
    job = Job(tmp_path, fleet.address, 4, "--device", "gpu")
    job.wait_line("waiting for a node with 1 GPU for a gang of one worker")
    gpu_node = fleet.add_node(num_cpus=1, num_gpus=1)  # Ray fakes the GPU on a CPU machine
    try:
        assert job.finish() == 0, job.said()
        table = index(job.out)
        assert sorted(r["id"] for r in table) == [f"f/{i:03d}" for i in range(4)]
        # Placed where the GPU is (a small model renders on CPU inside the fake-GPU worker).
        assert {r["node"] for r in table} == {gpu_node.node_id}
        assert live_placement_groups(fleet.address) == []  # ended normally: nothing left behind
    finally:
        fleet.remove_node(gpu_node)


def test_a_drained_node_gets_no_new_unit_and_sigint_leaves_no_placement_group(fleet, tmp_path):
    second = fleet.add_node(num_cpus=1)
    job = Job(tmp_path, fleet.address, 1000, "--max-in-flight", "2")  # SIGINT ends it long before
    try:
        job.wait_for(
            "rows on both nodes",
            lambda: committed_rows(job.out) and len({r["node"] for r in index(job.out)}) == 2,
        )
        drained = subprocess.run(
            [str(RAY), "drain-node", "--address", fleet.address, "--node-id", second.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot notice",
             "--deadline-remaining-seconds", "300"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert drained.returncode == 0, drained.stderr
        job.wait_line(f"node {second.node_id[:8]} is being drained")
        seen = time.time()
        before = committed_rows(job.out)
        job.wait_rows(before + 6)
        late = [
            r for r in index(job.out) if r["node"] == second.node_id and r["finished_at"].timestamp() > seen
        ]
        # Only the units it held when the drain was seen (--max-in-flight 2, one row each) finish there.
        assert len(late) <= 2, late
        # Its units done, the replica moves off the node (and Ray places no gang on a drained node).
        job.wait_line(f"node {second.node_id[:8]} drained; rebuilding it where the cluster has room")
        job.process.send_signal(signal.SIGINT)
        assert job.finish() == 130, job.said()
        table = index(job.out)
        assert len({r["id"] for r in table}) == len(table)  # interrupted: each id at most once
        assert live_placement_groups(fleet.address) == []  # ended by SIGINT: nothing left behind
    finally:
        if second is not None:
            fleet.remove_node(second)
        if job.process.poll() is None:
            job.process.kill()
