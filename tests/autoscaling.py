"""A real local autoscaling Ray cluster for tests, on Ray's fake multi-node provider.

`autoscaling_cluster(tmp_path, head_cpus=1, worker_types={...})` starts `ray start --head` on
127.0.0.1 with an autoscaler (v1, Ray's default) whose node provider is `fake_multinode`
(ray/autoscaler/_private/fake_multi_node/node_provider.py): when the autoscaler scales up, the
provider starts another raylet on this machine, with the node type's resources, that joins this
head as a worker node; when it scales down, the provider stops that raylet. That is what
`ray.cluster_utils.AutoscalingCluster` does, but that class cannot be used here: its `start()`
runs `ray stop --force`, which kills every Ray on the machine (other test runs have theirs), it
listens on the fixed default ports, and its config is built from fake_multi_node/example.yaml,
which this Ray wheel lacks. Here every port is a free one, the config is written in full, and the
teardown ends this cluster's processes and no others.

`ray start --node-ip-address 127.0.0.1` gives the head this machine's outbound IP all the same
(scripts.py: services.resolve_ip_for_localhost), and the launched nodes take it too: every node
has that IP, the autoscaler tells them apart by node id (use_node_id_as_ip), and the GCS answers
on 127.0.0.1, the address clients are given.

    with autoscaling_cluster(tmp_path, head_cpus=1, worker_types={
        "cpu2": {"resources": {"CPU": 2}, "max_workers": 2},
    }) as cluster:
        subprocess.run([..., "--address", cluster.address], env=cluster.env)
        cluster.wait_for_workers(2)
        assert cluster.resource_request() == [{"CPU": 2}, {"CPU": 2}]

Token auth stays on, as on users' clusters: the head, the autoscaler and the nodes it launches
run with RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (tests/conftest.py makes sure it
exists), and `cluster.env` carries RAY_AUTH_MODE=token for clients.

The helpers that look at the cluster (`resource_request`, `alive_nodes`, `wait_for_workers`)
ask its GCS from a short subprocess (a bare GcsClient, no driver): the test process need not
import Ray, nor connect to this cluster.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import free_port, session_processes, wait_for_port

RAY = Path(sys.executable).with_name("ray")
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}
HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's head node type (FAKE_HEAD_NODE_TYPE)
START_TIMEOUT = 90.0
"""Seconds for the head's ports to open and its autoscaler to report its first round."""


def cluster_config(
    *,
    head_resources: dict,
    worker_types: dict,
    gcs_address: str,
    idle_timeout_minutes: float,
    upscaling_speed: float,
    max_workers: int | None,
) -> dict:
    """The autoscaling config `ray start --head --autoscaling-config` hands to the autoscaler:
    the fields of fake_multi_node/example.yaml, with these node types. The autoscaler reads the
    file as it is (no defaults merged in, unlike `ray up`), so every field it reads is here."""
    if HEAD_NODE_TYPE in worker_types:
        raise ValueError(f"{HEAD_NODE_TYPE!r} is the head's node type, made from head_cpus")
    types = {}
    for name, spec in worker_types.items():
        spec = copy.deepcopy(spec)
        if "CPU" not in spec.get("resources", {}):
            raise ValueError(f"worker type {name!r} needs resources with CPU: {spec}")
        spec.setdefault("node_config", {})
        spec.setdefault("min_workers", 0)
        spec.setdefault("max_workers", 1)
        types[name] = spec
    types[HEAD_NODE_TYPE] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "cogdist-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()) if max_workers is None else max_workers,
        "provider": {
            "type": "fake_multinode",
            # The provider starts each node with `gcs_address=` this; without it, port 6379 of
            # this machine, i.e. whichever Ray listens there, not this head.
            "gcs_address": gcs_address,
            # Nodes are told apart by node id, not IP: every fake node has this machine's IP.
            "use_node_id_as_ip": True,
            # No SSH, no setup commands: the provider starts the raylet itself.
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # One node per launch, whatever its count (the provider's default, and what Ray's
            # AutoscalingCluster runs autoscaler v1 with): the autoscaler asks again a round
            # later for the rest. With launch_multiple the provider starts all N, but then the
            # autoscaler now and then launched one node too many and terminated it at once
            # ("Terminating the node with id ...00003 ... (max_workers_per_type)").
            "launch_multiple": False,
        },
        "available_node_types": types,
        "head_node_type": HEAD_NODE_TYPE,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass(frozen=True)
class AutoscalingCluster:
    address: str
    """The GCS, HOST:PORT: `ray.init(address=...)`, `cogdist render --address`."""
    dashboard: str | None
    """The dashboard (job server), http://HOST:PORT, for `ray job submit`; None without one."""
    env: dict[str, str]
    """The environment for a client subprocess: os.environ with RAY_AUTH_MODE=token and the venv's
    bin first on PATH."""
    config: Path
    """The autoscaling config the autoscaler runs with (JSON)."""
    temp_dir: Path
    """The cluster's Ray temp dir (its session dir, logs and sockets lie under it)."""
    head_pid: int
    """`ray start --head --block`, the leader of the session every process of the cluster is in."""

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def resource_request(self) -> list[dict] | None:
        return resource_request(self.address, self.env)

    def alive_nodes(self) -> list[dict]:
        return alive_nodes(self.address, self.env)

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> list[dict]:
        return wait_for_workers(self.address, self.env, count, timeout, logs=self.logs)

    def processes(self) -> list[psutil.Process]:
        """The cluster's live processes (see the teardown): head, autoscaler, launched nodes."""
        return _cluster_processes(self.head_pid, int(self.address.rsplit(":", 1)[1]), self.temp_dir)

    def monitor_log(self, chars: int = 4000) -> str:
        """The end of the autoscaler's log (what it launched, terminated, and why)."""
        return _tail(self.logs / "monitor.log", chars)


# --- looking at the cluster -----------------------------------------------------------------

# Run as `python -c _PROBE ADDRESS`: one JSON line with the autoscaler's resource request
# (commands.request_resources writes it, for autoscaler v1, to the GCS internal KV key
# AUTOSCALER_RESOURCE_REQUEST_CHANNEL in the default namespace, as JSON: a list of bundles;
# monitor.update_resource_requests reads it there every round), whether the autoscaler has
# reported a round yet (the KV key DEBUG_AUTOSCALING_STATUS, which monitor writes each round),
# and the alive nodes.
_PROBE = r"""
import json, sys
from ray._private import ray_constants
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo

gcs = GcsClient(address=sys.argv[1])
request = gcs.internal_kv_get(ray_constants.AUTOSCALER_RESOURCE_REQUEST_CHANNEL, None, timeout=10)
status = gcs.internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), None, timeout=10)
error = gcs.internal_kv_get(ray_constants.DEBUG_AUTOSCALING_ERROR.encode(), None, timeout=10)
nodes = []
for node_id, info in gcs.get_all_node_info(timeout=10).items():
    if info.state != GcsNodeInfo.GcsNodeState.ALIVE:
        continue
    nodes.append({
        "node_id": node_id.hex(),
        "ip": info.node_manager_address,
        "is_head": info.is_head_node,
        "resources": dict(info.resources_total),
        "labels": dict(info.labels),
    })
print(json.dumps({
    "request": None if request is None else json.loads(request),
    "autoscaler_reported": status is not None,
    "autoscaler_error": None if error is None else error.decode(errors="replace"),
    "nodes": nodes,
}))
"""


def probe(address: str, env: dict[str, str], timeout: float = 60.0) -> dict:
    """What the cluster's GCS holds now: {"request": the autoscaler's resource request (a list of
    bundles, or None if nobody ever called request_resources), "autoscaler_reported": whether the
    autoscaler has finished a round, "autoscaler_error": its last error or None, "nodes": the
    alive nodes, as `alive_nodes` lists them}."""
    for _ in range(3):
        # A GCS busy on 2 loaded cores can miss a fresh client's 30 s connect: ask again.
        result = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if result.returncode == 0 or "waiting for GCS to become available" not in result.stderr:
            break
    if result.returncode != 0:
        raise RuntimeError(f"could not read the GCS at {address}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def resource_request(address: str, env: dict[str, str]) -> list[dict] | None:
    """The demand `ray.autoscaler.sdk.request_resources` left with the autoscaler: its bundles
    (`num_cpus=N` is N bundles {"CPU": 1}), [] after `request_resources(bundles=[])` (or
    `num_cpus=0`), None if nobody called it. Each call replaces the previous request."""
    return probe(address, env)["request"]


def alive_nodes(address: str, env: dict[str, str]) -> list[dict]:
    """The cluster's alive nodes: {"node_id", "ip", "is_head", "resources" (totals), "labels"}.
    The fake provider's nodes have the ids fff…f00001, fff…f00002, … (the head fff…f00000)."""
    return probe(address, env)["nodes"]


def wait_for_workers(
    address: str, env: dict[str, str], count: int, timeout: float = 60.0, *, logs: Path | None = None
) -> list[dict]:
    """Wait until exactly `count` worker nodes (alive, not the head) are in the cluster; returns
    them. Polls the GCS about once a second; on the deadline, raises TimeoutError with what it
    saw last and the end of the autoscaler's log. `count=0` waits for a scale-down.

    The fake provider starts a node in the autoscaler's process, one at a time, each in a few
    seconds: on 2 busy cores, 2 nodes join 6-15 s after a request_resources."""
    deadline = time.monotonic() + timeout
    while True:
        seen = probe(address, env)
        workers = [node for node in seen["nodes"] if not node["is_head"]]
        if len(workers) == count:
            return workers
        if time.monotonic() > deadline:
            monitor = _tail(logs / "monitor.log", 3000) if logs else "(no logs given)"
            raise TimeoutError(
                f"{len(workers)} alive worker node(s) instead of {count} after {timeout:.0f} s: "
                f"{[(w['node_id'][-5:], w['resources']) for w in workers]}; autoscaler's request "
                f"{seen['request']}, its last error {seen['autoscaler_error']!r}.\n"
                f"monitor.log ends:\n{monitor}"
            )
        time.sleep(1.0)


# --- starting and stopping --------------------------------------------------------------------


@contextlib.contextmanager
def autoscaling_cluster(tmp_path: Path, **how: Any) -> Iterator[AutoscalingCluster]:
    """Start a local autoscaling Ray cluster, yield it, and end every process it started. `how`,
    as `_one_cluster` takes it (its defaults):

    head_cpus: the head's CPUs (`ray start --num-cpus`, so a whole number). 0 keeps all work off
        the head, on the nodes the autoscaler launches.
    worker_types: the autoscaler's worker node types, as in a cluster config's
        available_node_types: {name: {"resources": {"CPU": n, ...}, "min_workers": 0,
        "max_workers": m}}; node_config defaults to {}, min_workers to 0, max_workers to 1.
        Each node of a type is a raylet on this machine with exactly those resources (give it
        "object_store_memory": bytes to cap its object store).
    head_resources: custom resources of the head (CPU goes in head_cpus).
    idle_timeout_minutes: how long a worker node stays idle (no tasks, actors, nor a resource
        request it serves) before the autoscaler stops it.
    upscaling_speed, max_workers: as in a cluster config (max_workers: the sum of the types'
        max_workers by default).
    dashboard: start the dashboard (job server) on a free port; off saves a process on the head.

    The autoscaler runs a round every second (AUTOSCALER_UPDATE_INTERVAL_S=1). On exit, or if it
    does not come up, `ray start` is stopped and every process in its session, or naming this
    cluster's temp dir or GCS port, is killed; if any survives, this raises. `ray start --head`
    itself sometimes fails on a loaded machine ("Failed to get node info: Deadline Exceeded"
    while its GCS is slow to answer): then the cluster is started once more, afresh.
    """
    stack = contextlib.ExitStack()
    try:
        cluster = stack.enter_context(_one_cluster(tmp_path, **how))
    except HeadExited as e:
        print(f"starting the autoscaling cluster once more: {str(e).splitlines()[0]}", file=sys.stderr)
        cluster = stack.enter_context(_one_cluster(tmp_path / "second-start", **how))
    with stack:
        yield cluster


@contextlib.contextmanager
def _one_cluster(
    tmp_path: Path,
    *,
    head_cpus: int,
    worker_types: dict,
    head_resources: dict | None = None,
    idle_timeout_minutes: float = 1.0,
    upscaling_speed: float = 1.0,
    max_workers: int | None = None,
    dashboard: bool = True,
    start_timeout: float = START_TIMEOUT,
) -> Iterator[AutoscalingCluster]:
    """`autoscaling_cluster`, started once."""
    head_cpus_int = int(head_cpus)
    if head_cpus_int != head_cpus:
        raise ValueError(f"head_cpus must be a whole number (ray start --num-cpus): {head_cpus}")
    head_resources = dict(head_resources or {})
    if "CPU" in head_resources:
        raise ValueError("give the head's CPUs as head_cpus, not in head_resources")

    tmp_path.mkdir(parents=True, exist_ok=True)
    # Ray's temp dir for this cluster alone, short (Unix socket paths under it must stay under
    # 107 bytes, which a pytest tmp_path can exceed) and unique: the teardown finds the
    # cluster's processes by it. The launched nodes take the head's temp dir from the GCS.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-as-", dir="/tmp"))
    port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    address = f"127.0.0.1:{port}"
    config_path = tmp_path / "autoscaling-config.json"
    config = cluster_config(
        head_resources={"CPU": head_cpus_int, **head_resources},
        worker_types=worker_types,
        gcs_address=address,
        idle_timeout_minutes=idle_timeout_minutes,
        upscaling_speed=upscaling_speed,
        max_workers=max_workers,
    )
    config_path.write_text(json.dumps(config, indent=2))

    # The venv's bin first on PATH, as on a node whose image has cogdist's Python.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    client_env = {**os.environ, **TOKEN_AUTH, "PATH": path}
    client_env.pop("RAY_ADDRESS", None)  # clients name this cluster themselves
    # Autoscaler v1, Ray's default, whatever the caller's environment says: request_resources
    # then writes its demand where `resource_request` reads it (v2 keeps it elsewhere).
    client_env["RAY_enable_autoscaler_v2"] = "0"
    head_env = {
        **client_env,
        # The fake provider refuses to start without it; with it, `ray start --head` gives the
        # head the node id the provider expects (FAKE_HEAD_NODE_ID).
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # a round a second, not every 5 s
    }
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
        str(head_cpus_int),
        "--autoscaling-config",
        str(config_path),
        "--temp-dir",
        str(temp_dir),
        "--ray-client-server-port",
        str(client_port),
        "--dashboard-agent-listen-port",
        str(agent_port),
        "--disable-usage-stats",
    ]
    if head_resources:
        command += ["--resources", json.dumps(head_resources)]
    if dashboard:
        command += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    else:
        command += ["--include-dashboard", "false"]

    started = time.monotonic()
    start_log = tmp_path / "ray-start.log"
    with open(start_log, "wb") as log:
        head = subprocess.Popen(
            command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=head_env
        )
    cluster = AutoscalingCluster(
        address=address,
        dashboard=f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
        env=client_env,
        config=config_path,
        temp_dir=temp_dir,
        head_pid=head.pid,
    )
    try:
        _wait_until_up(
            cluster,
            head,
            start_log,
            [port, agent_port] + ([dashboard_port] if dashboard else []),
            started + start_timeout,
        )
        yield cluster
    finally:
        try:
            _stop(head, port, temp_dir)
        finally:
            # The autoscaler's and GCS's logs outlive the cluster, for a failed test's reader.
            kept = tmp_path / "ray-logs"
            for log in sorted(cluster.logs.glob("monitor*")) + sorted(cluster.logs.glob("gcs_server.*")):
                with contextlib.suppress(OSError):
                    kept.mkdir(exist_ok=True)
                    shutil.copy(log, kept / log.name)
            shutil.rmtree(temp_dir, ignore_errors=True)


class HeadExited(RuntimeError):
    """`ray start --head` exited before the cluster was up."""


def _wait_until_up(
    cluster: AutoscalingCluster, head: subprocess.Popen, start_log: Path, ports: list[int], deadline: float
) -> None:
    def failed(why: str, kind: type[RuntimeError] = RuntimeError) -> RuntimeError:
        return kind(
            f"the autoscaling cluster did not come up: {why}\n"
            f"`ray start` said:\n{_tail(start_log, 3000)}\n"
            f"monitor.err ends:\n{_tail(cluster.logs / 'monitor.err', 2000)}\n"
            f"monitor.log ends:\n{_tail(cluster.logs / 'monitor.log', 2000)}"
        )

    for listening in ports:
        while not wait_for_port(listening, 1):
            if head.poll() is not None:
                raise failed(f"`ray start --head` exited with {head.returncode}", HeadExited)
            if time.monotonic() > deadline:
                raise failed(
                    f"port 127.0.0.1:{listening} did not open (the cluster needs free loopback ports; "
                    "Ray's workers also take ports from 10002-19999)"
                )
    seen: dict = {}
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise failed(f"`ray start --head` exited with {head.returncode}", HeadExited)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            seen = probe(cluster.address, cluster.env, timeout=max(5.0, deadline - time.monotonic()))
            if seen["autoscaler_error"]:
                raise failed(f"the autoscaler failed: {seen['autoscaler_error'][-2000:]}")
            if seen["autoscaler_reported"] and any(node["is_head"] for node in seen["nodes"]):
                return
        time.sleep(0.5)
    raise failed(f"no head node alive with an autoscaler that has reported a round; last seen {seen}")


def _stop(head: subprocess.Popen, port: int, temp_dir: Path) -> None:
    # What names this cluster's GCS port, looked for while the port is still this cluster's
    # (once the GCS is gone, another Ray may take it).
    naming_port = _cluster_processes(head.pid, port, temp_dir, by_session=False)
    # SIGTERM to `ray start --block` alone: it stops the head's processes in a few seconds
    # (sent to the whole session, it hangs among its killed children). The nodes the
    # autoscaler launched are the autoscaler's children, which it leaves behind: killed below.
    head.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=20)
    if head.poll() is None:
        head.kill()
        head.wait(timeout=10)
    # Every process left of this cluster: in the head's session (start_new_session: its id is
    # the head's pid; Ray starts its processes, and the fake provider its nodes, without a
    # session of their own), naming this cluster's temp dir, or named the GCS port above.
    # Never this process nor its parents: psutil.Process compares pid and start time, so a
    # recycled pid is not taken for one of these.
    for _ in range(3):
        left = _alive(_cluster_processes(head.pid, None, temp_dir) + naming_port)
        if not left:
            return
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=10)
    left = _alive(_cluster_processes(head.pid, None, temp_dir) + naming_port)
    if left:
        raise RuntimeError(f"processes of the autoscaling cluster outlived SIGKILL: {_describe(left)}")


def _cluster_processes(
    sid: int, port: int | None, temp_dir: Path, *, by_session: bool = True
) -> list[psutil.Process]:
    """The live processes in session `sid` (by_session), or whose command line names
    `temp_dir` or (port given) the GCS address HOST:port, other than this one and its parents."""
    names_port = re.compile(rf"(?:address|gcs[-_]address)[= ]\S*:{port}(?!\d)") if port else None
    found = {process.pid: process for process in session_processes(sid)} if by_session else {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(temp_dir) in cmdline or (names_port and names_port.search(cmdline)):
            found.setdefault(process.pid, process)
    return _alive(list(found.values()))


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    me = psutil.Process()
    spared = {me, *me.parents()}
    alive = []
    for process in dict.fromkeys(processes):  # psutil.Process hashes by pid and start time
        with contextlib.suppress(psutil.NoSuchProcess):
            if process not in spared and process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def _describe(processes: list[psutil.Process]) -> str:
    out = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            out.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
    return "; ".join(out)


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"
