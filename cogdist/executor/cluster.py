"""Connecting to Ray: an existing cluster, or an embedded local instance started in process."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass

from cogdist.errors import UsageError


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster, as the driver sees it now."""

    id: str
    host: str
    raylet_port: int
    cpus: float
    gpus: float
    draining: bool = False
    """Drained (`ray drain-node`, a spot notice through KubeRay): it gets no new work."""


@dataclass
class Cluster:
    """The Ray instance a render runs on, and whether this process started it."""

    address: str
    owned: bool
    cpus: float  # logical CPUs of the whole cluster
    gpus: float
    max_node_cpus: float  # logical CPUs of its largest node
    start_seconds: float
    max_node_gpus: float = 0.0  # GPUs of its largest node
    reaper: subprocess.Popen | None = None
    nodes: tuple[Node, ...] = ()
    """Its alive nodes when the job started."""


def connect(address: str | None = None, *, num_cpus: int | None = None) -> Cluster:
    """Join `address` (or $RAY_ADDRESS, or a Ray already initialised in this process);
    otherwise start a local instance that lives as long as this render."""
    import ray

    start = time.perf_counter()
    owned = False
    reaper = None
    if ray.is_initialized():
        pass
    elif address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        try:
            ray.init(address=target, logging_level=logging.WARNING)
        except Exception as e:
            refusal = _auth_refusal(e)
            if refusal is None:
                raise
            raise UsageError(
                f"the Ray cluster at {target} refused this driver: {refusal}. A cluster "
                "with token authentication (the default of `ray start --head` since Ray 2.60) needs "
                "RAY_AUTH_MODE=token here, and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(`ray get-auth-token` on the head prints it)"
            ) from None
    else:
        from cogdist.executor import reaper as reaper_module

        reaper = reaper_module.start()
        owned = True
        # Ray 2.60 turns token auth on for the instance it starts, and warns that it did on every
        # run: auth stays on (a user's own RAY_AUTH_MODE is respected), the warning goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # address="local": never attach to a cluster that `ray start` left on this machine.
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    resources = ray.cluster_resources()
    nodes = alive_nodes()
    return Cluster(
        address=ray.get_runtime_context().gcs_address,
        owned=owned,
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
        max_node_cpus=max((n.cpus for n in nodes), default=0.0),
        max_node_gpus=max((n.gpus for n in nodes), default=0.0),
        start_seconds=time.perf_counter() - start,
        reaper=reaper,
        nodes=tuple(nodes),
    )


def _auth_refusal(error: BaseException) -> str | None:
    """The first line of a token-auth refusal anywhere in `error`'s chain, or None (another error).
    Ray raises AuthenticationError, or a ConnectionError over the GCS client's "Unauthenticated"."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if (
            type(seen).__name__ == "AuthenticationError"
            or "InvalidAuthToken" in text
            or "Unauthenticated" in text
        ):
            return text.strip().splitlines()[0][:300] if text.strip() else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


def disconnect(cluster: Cluster) -> None:
    """Shut down the instance this process started; leave anyone else's running."""
    if not cluster.owned:
        return
    import ray

    ray.shutdown()
    if cluster.reaper is not None:
        from cogdist.executor import reaper as reaper_module

        reaper_module.stop(cluster.reaper)


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes, with those being drained marked."""
    import ray

    draining: dict[str, int] = {}
    with contextlib.suppress(Exception):  # a private call: without it, no node is seen draining
        from ray._private.state import state

        draining = state.get_draining_nodes()
    return [
        Node(
            id=n["NodeID"],
            host=n["NodeManagerAddress"],
            raylet_port=int(n["NodeManagerPort"]),
            cpus=n["Resources"].get("CPU", 0.0),
            gpus=n["Resources"].get("GPU", 0.0),
            draining=n["NodeID"] in draining,
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def gangs_fitting(nodes: list[Node], bundle: dict[str, float], size: int) -> int:
    """How many gangs of `size` such bundles the nodes hold when empty (a gang never spans nodes)."""
    total = 0
    for node in nodes:
        if node.draining:
            continue
        have = {"CPU": node.cpus, "GPU": node.gpus}
        total += min(int(have.get(name, 0.0) // (amount * size)) for name, amount in bundle.items() if amount)
    return total


def node_gone(node_id: str, nodes: list[Node], known: dict[str, Node]) -> bool:
    """Whether a node the job used has left: the GCS no longer lists it alive, or its raylet does
    not answer (the GCS notices a killed node only after its health checks, seconds later)."""
    alive = {n.id for n in nodes}
    if node_id not in alive:
        return True
    node = known.get(node_id)
    if node is None:
        return False
    try:
        with socket.create_connection((node.host, node.raylet_port), timeout=2.0):
            return False
    except OSError:
        return True
