"""Chaos of the fleet: a job on a real multi-node Ray cluster on one machine
(`ray.cluster_utils.Cluster`: a head without CPUs, worker nodes of one CPU each) whose nodes are
SIGKILLed (raylet and workers, as a preempted VM goes) and replaced while it runs, as a week on
spot instances would do to it. The job follows the cluster (`--cpus-per-worker 1`, no
`--replicas`): it grows onto nodes that join and rebuilds the gangs of nodes that died, with no
restart by the user. Every event strikes at a point of the job's progress (rows indexed since
the last event), never at a time on the clock.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cogdist.sink.journal import read_done
from cogdist.storage import open_location
from tests.chaos.harness import ROOT, STEPS, Outcome, audit, chaos_manifest, render_command, settle_session
from tests.chaos.progress import POLL_SECONDS, Watcher

CPUS_PER_NODE = 1
DEADLINE_SECONDS = 900.0
"""A scenario that makes no progress for this long has failed (a bound, not a pace)."""


@contextlib.contextmanager
def local_cluster(nodes: int = 1, **head_args) -> Iterator:
    """A head node without CPUs (the driver's; no worker lands there) and `nodes` worker nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **head_args})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=CPUS_PER_NODE)
        yield cluster
    finally:
        cluster.shutdown()


def fleet_command(manifest: Path, out: str, address: str, *flags: str, steps: int = STEPS) -> list[str]:
    """The chaos render, joined to `address` and following its nodes (no fixed --replicas)."""
    command = render_command(
        manifest, out, "--address", address, "--cpus-per-worker", "1", *flags, steps=steps
    )
    at = command.index("--replicas")
    return command[:at] + command[at + 2 :]


def node_workers(node) -> list:
    """The Ray worker processes a node's raylet runs, those busy with a task or an actor."""
    import psutil

    raylet = node.all_processes["raylet"][0].process.pid
    workers = []
    for child in psutil.Process(raylet).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())
            if title.startswith("ray::") and not title.startswith("ray::IDLE"):
                workers.append(child)
    return workers


@contextlib.contextmanager
def frozen(nodes) -> Iterator[None]:
    """The renderers of `nodes` stopped (SIGSTOP) until the block ends: the job can go on only on
    other nodes, however fast those nodes start compared with how fast these render."""
    stopped = [worker for node in nodes for worker in node_workers(node)]
    for worker in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for worker in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGCONT)


def node_ids(out: str) -> list[str]:
    """The `node` column of OUT's committed rows (index/ and its journal)."""
    table = read_done(open_location(out), ["node"])
    return table["node"].to_pylist() if table is not None else []


def spot_week(
    workdir: Path,
    kills: int = 4,
    rows: int | None = None,
    gap: tuple[int, int] = (3, 6),
    seed: int = 5,
    steps: int = STEPS,
) -> Outcome:
    """One job through a changing fleet: it starts on one node; after `gap` rows a second node
    joins, and once the job has rendered a row there (it grew onto it), `kills` times: after
    `gap` more rows a worker node is SIGKILLed; once the survivor has indexed another row a fresh
    node joins in its place, and the next kill waits for a row rendered on it. Until it has, the
    other nodes' renderers are stopped (SIGSTOP): a node's start costs seconds, not rows, and the
    job must not run out of rows before it. The job must finish by itself with every id once.
    `rows` defaults to enough for every event to land (the job finishing first is reported as a
    problem)."""
    from cogdist.storage import open_location

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = rows or 100 * (2 * kills + 1)
    manifest, ids = chaos_manifest(workdir / "manifest.parquet", rows)
    out = str(workdir / "out")
    events: list[str] = []
    problems: list[str] = []
    log = workdir / "run.log"
    with local_cluster(nodes=1) as cluster:
        first = next(iter(cluster.worker_nodes)).node_id
        joined: list[str] = []
        command = fleet_command(manifest, out, cluster.address, steps=steps)
        with open(log, "wb") as sink:
            driver = subprocess.Popen(
                command, cwd=ROOT, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
            )
        sid = os.getsid(driver.pid)
        watcher = Watcher(open_location(out), sid)
        hold = contextlib.ExitStack()  # the other nodes stopped while a joined node is awaited
        try:
            plan = ["join"] + ["kill", "join"] * kills
            last, wanted, last_change = 0, rng.randint(*gap), time.monotonic()
            awaited: str | None = None  # a joined node the job has not rendered on yet
            while driver.poll() is None:
                watcher.look()
                if watcher.changed:
                    last_change = time.monotonic()
                    if awaited is not None and awaited in node_ids(out):
                        events.append(f"first row on {awaited[:8]} at {watcher.rows} rows")
                        awaited, last = None, watcher.rows
                        hold.close()
                if time.monotonic() - last_change > DEADLINE_SECONDS:
                    problems.append(f"no row indexed for {DEADLINE_SECONDS:.0f}s at {watcher.rows} rows")
                    break
                if plan and awaited is None:
                    # A join replaces a killed node once the survivor has gone on (one more row).
                    needed = 1 if plan[0] == "join" and events else wanted
                    if watcher.rows - last >= needed:
                        if plan.pop(0) == "kill":
                            victim = rng.choice(list(cluster.worker_nodes))
                            cluster.remove_node(victim, allow_graceful=False)
                            events.append(f"kill {victim.node_id[:8]} at {watcher.rows} rows")
                        else:
                            others = list(cluster.worker_nodes)
                            node = cluster.add_node(num_cpus=CPUS_PER_NODE)
                            hold.enter_context(frozen(others))
                            joined.append(node.node_id)
                            awaited = node.node_id
                            events.append(f"join {node.node_id[:8]} at {watcher.rows} rows")
                        last, wanted = watcher.rows, rng.randint(*gap)
                time.sleep(POLL_SECONDS)
            code = driver.wait(timeout=DEADLINE_SECONDS)
        finally:
            hold.close()
            if driver.poll() is None:
                driver.kill()
            settle_session(sid, 10.0)
        said = log.read_text(errors="replace")
        found = audit(out, ids)
        nodes = node_ids(out) if found.indexed else []
    on_joined = sum(1 for n in nodes if n in joined)
    landed = sum(1 for e in events if e.startswith("kill"))
    used = sum(1 for e in events if e.startswith("first row"))
    outcome = found.outcome(
        "spot-week",
        "worker nodes SIGKILLed (raylet and workers) and fresh nodes joined through one run",
        landed,
        time.monotonic() - started,
        f"seed {seed}, {rows} rows, {steps} steps; {'; '.join(events)}; run exit {code}; "
        f"rows by node: first {nodes.count(first)}, on {len(joined)} joined later {on_joined}; "
        f"grew onto a joined node {said.count('room for another gang')}x, gangs of lost nodes rebuilt "
        f"{said.count('node lost') + said.count('left the cluster')}x",
    )
    if landed < kills:
        problems.append(f"only {landed} of {kills} node kills landed: the job finished first")
    if used < len(joined):
        problems.append(f"the job rendered on {used} of the {len(joined)} nodes that joined during the run")
    if code != 0:
        problems.append(f"the run exited {code}: {said[-800:]}")
    outcome.problems = problems + outcome.problems
    return outcome
