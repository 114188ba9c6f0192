"""Connecting to Ray: an existing cluster, or an embedded local instance started in process."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass


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
        ray.init(address=address or os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        from cogdist.executor import reaper as reaper_module

        reaper = reaper_module.start()
        owned = True
        # address="local": never attach to a cluster that `ray start` left on this machine.
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(
        address=ray.get_runtime_context().gcs_address,
        owned=owned,
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
        max_node_cpus=max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0),
        max_node_gpus=max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0),
        start_seconds=time.perf_counter() - start,
        reaper=reaper,
    )


def disconnect(cluster: Cluster) -> None:
    """Shut down the instance this process started; leave anyone else's running."""
    if not cluster.owned:
        return
    import ray

    ray.shutdown()
    if cluster.reaper is not None:
        from cogdist.executor import reaper as reaper_module

        reaper_module.stop(cluster.reaper)
