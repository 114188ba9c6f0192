"""The up-front half of a render: everything that can be checked is checked before Ray starts
(model, options, the whole manifest), so a refused run writes nothing; and what each replica and
worker is given."""

from __future__ import annotations

from dataclasses import dataclass

from cogdist.executor.cluster import Cluster
from cogdist.executor.gang import GangSpec
from cogdist.manifest import ManifestSource, validate_manifest
from cogdist.models.registry import ModelSpec, resolve_model, with_defaults
from cogdist.options import RenderOptions
from cogdist.sink import SINKS
from cogdist.sink.job import JobSettings
from cogdist.storage import Location, open_location
from cogdist.worker.settings import WorkerSettings


@dataclass(frozen=True)
class Plan:
    """A render that passed every up-front check."""

    options: RenderOptions
    spec: ModelSpec
    source: ManifestSource
    out: Location
    settings: JobSettings


def plan(options: RenderOptions) -> Plan:
    """Resolve the model and check options and manifest; writes nothing."""
    spec = with_defaults(
        resolve_model(
            options.model, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code
        ),
        **options.row_defaults(),
    )
    options.check(spec)
    options = options.resolved(spec)
    source = ManifestSource(options.manifest)
    validate_manifest(source, spec)
    out = open_location(options.out, options.storage_timeout)
    settings = options.job_settings(spec, source.schema.names)
    return Plan(options, spec, source, out, settings)


def replica_layout(options: RenderOptions, cluster: Cluster) -> tuple[int, GangSpec]:
    """How many gangs, and what each member reserves, on this cluster."""
    size = options.gang_size
    if cluster.gpus >= 1:
        replicas = options.replicas or max(1, int(cluster.gpus // size))
        return replicas, GangSpec(size, options.cpus_per_worker or 1.0, 1.0)
    replicas = options.replicas or 2
    share = max(1, int(cluster.max_node_cpus // (replicas * size)))
    return replicas, GangSpec(size, options.cpus_per_worker or float(share), 0.0)


def worker_settings(options: RenderOptions, threads: int | None = None) -> WorkerSettings:
    """What every worker of a job is given, from the job's resolved options (those declared for
    workers); `threads`: torch's intra-op threads on a CPU worker (None: torch's default)."""
    return WorkerSettings(
        **options.worker_values(), threads=threads, return_outputs=SINKS[options.dataset].returns_outputs
    )
