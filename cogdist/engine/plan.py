"""The up-front half of a render: everything that can be checked is checked before Ray starts
(model, options, the whole manifest), so a refused run writes nothing; and what each replica and
worker is given."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cogdist.errors import UsageError
from cogdist.executor.cluster import Cluster, Node, gangs_fitting
from cogdist.executor.gang import GangSpec
from cogdist.manifest import ManifestSource, validate_manifest
from cogdist.manifest.columns import parse_column_map
from cogdist.manifest.rows import RowDefaults
from cogdist.models.layout import check_layout
from cogdist.models.registry import ModelSpec, resolve_model, with_defaults
from cogdist.options import RenderOptions
from cogdist.sink import SINKS
from cogdist.sink.encode import extension
from cogdist.sink.job import JobSettings, recorded_setting, update_job_setting
from cogdist.storage import Location, open_location
from cogdist.worker.attention import AUTO, NATIVE
from cogdist.worker.lora import adapter_names, adapter_uses, resolve_lora
from cogdist.worker.settings import WorkerSettings


@dataclass(frozen=True)
class Plan:
    """A render that passed every up-front check."""

    options: RenderOptions
    spec: ModelSpec
    source: ManifestSource
    out: Location
    settings: JobSettings

    @property
    def row_defaults(self) -> RowDefaults:
        """How the job's rows fill what they leave empty: output names, frames, adapters, samples."""
        return RowDefaults(
            extension=extension(self.options.format),
            save_frames=self.options.save_frames,
            adapters=adapter_uses(self.options.lora),
            samples=self.options.samples,
        )


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
    source = ManifestSource(options.manifest, column_map=parse_column_map(options.column_map))
    # The adapters are read and checked against the model before the rows that name them.
    lora, fuse = resolve_lora(
        spec,
        options.lora,
        options.fuse_lora,
        per_row="lora" in source.schema.names,
        quantize=options.quantize,
        allow_pickle=options.allow_pickle,
        storage_timeout=options.storage_timeout,
    )
    options = replace(options, lora=lora, fuse_lora=fuse)
    validate_manifest(source, spec, adapters=adapter_names(lora), samples=options.samples)
    out = open_location(options.out, options.storage_timeout)
    if options.attention_backend == AUTO:
        # A job resumed renders with the backend its first worker chose (None: native).
        chosen = recorded_setting(out, "attention_backend", missing=AUTO)
        options = replace(options, attention_backend=AUTO if chosen == AUTO else chosen or NATIVE)
    settings = options.job_settings(spec, source.schema.names)
    return Plan(options, spec, source, out, settings)


def pin_attention_backend(job: Plan, settings: WorkerSettings, chosen: str) -> WorkerSettings:
    """`--attention-backend auto` as the job's first worker resolved it: kept in OUT's job record
    (so a resume renders with it) and given to every worker started after."""
    value = None if chosen == NATIVE else chosen  # as the option records it
    job.settings.settings["attention_backend"] = value
    update_job_setting(job.out, "attention_backend", value)
    return replace(settings, attention_backend=chosen)


@dataclass(frozen=True)
class ReplicaLayout:
    """What each gang of a job reserves, and how many gangs it runs."""

    gang: GangSpec
    replicas: int
    """Gangs to start with."""
    follows_cluster: bool = False
    """Grow with the cluster (checked every few seconds) instead of keeping `replicas` fixed."""
    max_replicas: int | None = None
    needs: str = ""
    """What one gang needs, for the waiting line: "a node with 4 GPUs for a gang of --sp 4"."""

    def capacity(self, nodes: list[Node]) -> int:
        """Gangs the cluster's nodes hold, up to max_replicas."""
        fitting = gangs_fitting(nodes, self.gang.bundle(), self.gang.size)
        return min(fitting, self.max_replicas) if self.max_replicas else fitting


def wants_gpus(options: RenderOptions, spec: ModelSpec, cluster: Cluster) -> bool:
    """--device against the cluster: GPUs, or CPUs. Refused (UsageError) on the embedded instance
    when the job needs GPUs and the machine has none; a joined cluster may yet get them."""
    if options.device == "cpu":
        return False
    if options.device == "auto" and (cluster.gpus >= 1 or spec.fits_on_cpus):
        return cluster.gpus >= 1
    if cluster.owned and cluster.gpus < 1:
        why = (
            "--device gpu"
            if options.device == "gpu"
            else f"{spec.name} is too large to render on CPUs (a real checkpoint, or over 1B parameters by its configs)"
        )
        raise UsageError(
            f"{why}, and this machine has no GPU. Join a cluster with GPUs (--address), or render on CPUs "
            "anyway with --device cpu"
        )
    return True


def replica_layout(options: RenderOptions, spec: ModelSpec, cluster: Cluster) -> ReplicaLayout:
    """The job's gangs on this cluster. --replicas is a fixed count; without it a job that joined a
    cluster follows it (GPU gangs, or CPU gangs with --cpus-per-worker), and the embedded
    instance keeps one per GPU, or 2 CPU gangs sharing the machine."""
    size = options.gang_size
    shape = (
        f"--sp {options.sp}{' --cfg-parallel' if options.cfg_parallel else ''}" if size > 1 else "one worker"
    )
    if wants_gpus(options, spec, cluster):
        if cluster.owned:  # a gang's GPUs must share a node; a joined cluster may yet grow one
            check_layout(spec, options.sp, options.cfg_parallel, cluster.max_node_gpus)
        gang = GangSpec(size, options.cpus_per_worker or 1.0, 1.0)
        needs = f"a node with {_count(size, 'GPU')} for a gang of {shape}"
        follows = not cluster.owned and options.replicas is None
        fixed = options.replicas or max(1, int(cluster.gpus // size))
    elif options.cpus_per_worker is not None and not cluster.owned and options.replicas is None:
        gang = GangSpec(size, options.cpus_per_worker, 0.0)
        needs = f"a node with {_count(size * options.cpus_per_worker, 'CPU')} for a gang of {shape}"
        follows, fixed = True, 1
    else:
        replicas = options.replicas or 2
        share = max(1, int(cluster.max_node_cpus // (replicas * size)))
        gang = GangSpec(size, options.cpus_per_worker or float(share), 0.0)
        needs = f"a node with {_count(size * gang.cpus_per_member, 'CPU')} for a gang of {shape}"
        return ReplicaLayout(gang, replicas, needs=needs)
    layout = ReplicaLayout(gang, fixed, follows, options.max_replicas, needs)
    if follows:
        layout = replace(layout, replicas=max(1, layout.capacity(list(cluster.nodes))))
    return layout


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def worker_settings(options: RenderOptions, threads: int | None = None) -> WorkerSettings:
    """What every worker of a job is given, from the job's resolved options (those declared for
    workers); `threads`: torch's intra-op threads on a CPU worker (None: torch's default)."""
    return WorkerSettings(
        **options.worker_values(), threads=threads, return_outputs=SINKS[options.dataset].returns_outputs
    )
