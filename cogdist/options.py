"""RenderOptions: every knob of a render, declared once and validated before anything starts.

Each option is one `RenderOptions` field whose metadata (`option(...)`) says how the CLI spells
it and what it does to a job: the CLI's flags (cogdist.cli), the job record (cogdist.sink.job)
and the settings every worker receives (`worker_settings` in cogdist.engine) are derived from
these declarations. To add an option, add a field here; nothing else lists the options.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from cogdist.errors import UsageError
from cogdist.manifest.columns import column_map_record
from cogdist.models.layout import check_layout
from cogdist.models.registry import ModelSpec
from cogdist.option import OUTPUT, RECORDED, ROW_DEFAULTS, Option, check_limits, null_at, option
from cogdist.sink import SINKS, check_dataset
from cogdist.sink.dataset import DEFAULT_SHARD_SIZE, FILES
from cogdist.sink.encode import DEFAULT_QUALITY, IMAGE_FORMATS, VIDEO_FORMATS, check_output_format
from cogdist.sink.job import JobSettings
from cogdist.sink.journal import DEFAULT_INDEX_INTERVAL, FOLD_ROWS
from cogdist.storage import RETRY_SECONDS
from cogdist.worker.attention import AUTO, BACKENDS, NATIVE, check_attention_backend
from cogdist.worker.cache import CACHE_KINDS, FIRST_BLOCK, FIRST_BLOCK_THRESHOLD, NO_CACHE, check_step_cache
from cogdist.worker.checkpoint import CHECKPOINT_SECONDS, check_step_checkpoint
from cogdist.worker.compile import check_compile
from cogdist.worker.lora import check_lora, lora_record
from cogdist.worker.offload import CPU_OFFLOAD_ALIASES, NONE, OFFLOAD_MODES, check_offload
from cogdist.worker.quantize import NONE as QUANTIZE_NONE
from cogdist.worker.quantize import QUANTIZE_MODES, check_quantize

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "gpu", "cpu")
QUANTIZED = {"kind": OUTPUT, "worker": True, "choices": QUANTIZE_MODES, "record": null_at(QUANTIZE_NONE)}


def declared() -> Iterator[tuple[str, str, object, Option]]:
    """(name, annotation, default, Option) of every option, in declaration order (the CLI's)."""
    for f in fields(RenderOptions):
        yield f.name, str(f.type), f.default, f.metadata["option"]


def flag_of(name: str, how: Option) -> str:
    return how.flag if how.flag is not None else "--" + name.replace("_", "-")


def job_flags() -> dict[str, str]:
    """Job record key -> how a conflict message names it."""
    flags = {
        (how.spec_field or name): flag_of(name, how) for name, _, _, how in declared() if how.kind == OUTPUT
    }
    return {**flags, "columns": "the manifest's columns"}


@dataclass(frozen=True)
class RenderOptions:
    """Everything a render is asked to do: the manifest, model and OUT, and every knob (where a
    field's docstring is missing, its help says it all).

    Fields are declared in the order `cogdist render --help` lists them; each one's metadata is
    its Option. `check` refuses what cannot work with the model; `resolved` fills in what the
    model decides (format, quality, memory options, row defaults).
    """

    manifest: str = option("Parquet file, folder or glob; local path or s3:// / gs:// URI", flag="")
    model: str = option(
        "preset (see `cogdist models`), HF repo id or local folder",
        kind=OUTPUT,
        record=lambda value, spec: spec.name,
    )
    out: str = option("output folder or s3:// / gs:// prefix")
    replicas: int | None = option(
        "a fixed number of gangs (default: on a joined cluster, as many as it can place, growing as "
        "nodes join; locally, one per GPU or 2 without GPUs)",
        None,
        kind=RECORDED,
    )
    max_replicas: int | None = option(
        "at most this many gangs as the cluster grows, and asked of its autoscaler",
        None,
        kind=RECORDED,
        metavar="N",
    )
    device: str = option(
        "auto: GPUs whenever the cluster has or gets any, CPUs only for a small model (<= 1B "
        "parameters) when it has none; gpu: wait for GPUs; cpu: CPUs even where GPUs are",
        "auto",
        kind=RECORDED,
        choices=DEVICES,
    )
    capacity_timeout: float = option(
        "seconds a job waits for the cluster to place a gang (GPUs pending, a node too small) "
        "before it stops (default %(default).0f)",
        1800.0,
        kind=RECORDED,
        metavar="S",
    )
    sp: int = option(
        "sequence-parallel degree: GPUs sharing one sample (default %(default)s)",
        1,
        kind=RECORDED,
        worker=True,
    )
    collective_timeout: float = option(
        "seconds a gang member waits for a peer before the gang is rebuilt (default %(default).0f)",
        600.0,
        kind=RECORDED,
        worker=True,
    )
    """Seconds a gang member waits for a peer in a collective before the gang is rebuilt (a hung
    GPU or process). Longer than any rank-0-only stage: text encoding, GLM-Image's AR prior."""
    cfg_parallel: bool = option(
        "conditional and unconditional passes on two halves of the gang: 2 x --sp GPUs per gang",
        False,
        kind=RECORDED,
        worker=True,
    )
    samples: int = option(
        "outputs per manifest row: sample 0 is the row itself, sample k a row of its own with id "
        "'<id>#k' and a seed derived from the row's (default %(default)s)",
        1,
        kind=OUTPUT,
        metavar="N",
        record=null_at(1),
    )
    batch_size: int = option("rows of one shape per pipeline call (default %(default)s)", 1, kind=RECORDED)
    prior_batch: int = option(
        "GLM-Image: sample the AR prior of up to N rows of a unit together (default %(default)s)",
        1,
        kind=RECORDED,
        worker=True,
        metavar="N",
    )
    max_in_flight: int = option("units a replica holds at once (default %(default)s)", 64, kind=RECORDED)
    max_retries: int = option("retries of a failing row (default %(default)s)", 2, kind=RECORDED)
    max_gang_restarts: int = option(
        "failures in a row (its workers died, or failed to start) after which a replica is given "
        "up; a rendered unit resets the count, a lost node does not count (default %(default)s)",
        3,
        kind=RECORDED,
    )
    """Failures in a row after which a replica is given up (cogdist.failures.FailurePolicy)."""
    format: str | None = option(
        "output format (default: png; mp4 for videos)",
        None,
        kind=OUTPUT,
        worker=True,
        choices=(*IMAGE_FORMATS, *VIDEO_FORMATS),
        worker_default="png",
    )
    quality: int | None = option(
        "1..100: JPEG/WebP quality (default 95); MP4 quality (default 65 = CRF 18)",
        None,
        kind=OUTPUT,
        worker=True,
        worker_default=DEFAULT_QUALITY["png"],
    )
    """JPEG/WebP quality, or MP4 quality (1..100, mapped to H.264 CRF; default 65 = CRF 18)."""
    save_frames: bool = option("video models: also write every frame as a PNG", False, kind=OUTPUT)
    dataset: str = option(
        "files: one file per row under outputs/ (default); webdataset: tar shards under shards/; "
        "parquet: Hugging Face datasets Parquet with the media embedded, under data/",
        FILES,
        kind=OUTPUT,
        choices=tuple(SINKS),
        record=null_at(FILES),
    )
    shard_size: int = option(
        "samples per shard with --dataset webdataset/parquet (default %(default)s)",
        DEFAULT_SHARD_SIZE,
        kind=RECORDED,
        metavar="N",
    )
    """--dataset webdataset/parquet: samples per shard. Samples wait in the driver's memory until
    their shard is written; a killed run renders the unwritten ones again."""
    vae_tiling: bool | None = option(
        "decode in overlapping tiles", None, kind=OUTPUT, worker=True, group="memory", spec_field="vae_tiling"
    )
    vae_slicing: bool | None = option(
        "decode a batch one sample at a time",
        None,
        kind=RECORDED,
        worker=True,
        group="memory",
        spec_field="vae_slicing",
    )
    offload: str | None = option(
        "GPU: how much of the pipeline stays on the GPU: none (all), model (the running component), "
        "group (a few layers, copied ahead on a CUDA stream), sequential (one layer at a time)",
        None,
        kind=RECORDED,
        worker=True,
        group="memory",
        spec_field="offload",
        choices=OFFLOAD_MODES,
        worker_default=NONE,
        aliases=CPU_OFFLOAD_ALIASES,
    )
    dtype: str = option(
        "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16", "auto", kind=OUTPUT, worker=True
    )
    cache: str = option(
        "step cache on the transformer: reuse work between denoising steps (faster, pixels differ "
        "slightly; default none). CogView4: first-block, taylorseer; CogVideoX: also pab",
        NO_CACHE,
        kind=OUTPUT,
        worker=True,
        choices=CACHE_KINDS,
        record=null_at(NO_CACHE),
    )
    cache_threshold: float | None = option(
        f"--cache first-block: skip the other blocks while the first block's output changed by "
        f"less than T (relative; default {FIRST_BLOCK_THRESHOLD}); higher skips more",
        None,
        kind=OUTPUT,
        worker=True,
        metavar="T",
    )
    """--cache first-block: relative change of the first block's output below which the other
    blocks are skipped (default FIRST_BLOCK_THRESHOLD); higher skips more."""
    attention_backend: str = option(
        "diffusers attention backend of the transformer: native (default: torch's SDPA, as stock "
        "diffusers calls it), auto (the fastest exact one the workers run), _native_cudnn, flash, "
        "_flash_3, sage, flex, xformers, ...",
        NATIVE,
        kind=OUTPUT,
        worker=True,
        choices=(AUTO, *BACKENDS),
        metavar="NAME",
        record=null_at(NATIVE),
    )
    quantize: str = option(
        "quantize the transformer's weights: int8 (torchao, weight-only), int8-dynamic (int8 activations "
        "too), fp8 (GPUs of compute capability >= 8.9), bnb-8bit (bitsandbytes); pixels change (default none)",
        QUANTIZE_NONE,
        **QUANTIZED,
    )
    quantize_text_encoder: str = option("the same for the text encoder (T5, GLM)", QUANTIZE_NONE, **QUANTIZED)
    compile: bool = option(
        "torch.compile the transformer's repeated blocks: faster steps after a compile of seconds "
        "per shape (cached on the node's disk); pixels change by rounding only",
        False,
        kind=RECORDED,
        worker=True,
    )
    address: str | None = option("Ray cluster address (default: $RAY_ADDRESS, else a local instance)", None)
    cpus_per_worker: float | None = option("logical CPUs reserved per worker", None, kind=RECORDED)
    overwrite: bool = option("start over: remove what an earlier job wrote to OUT", False)
    retry_failed: bool = option("render rows recorded under failures/ again", False)
    storage_timeout: float = option(
        "seconds reads and writes of OUT are retried before the run stops (default %(default).0f)",
        RETRY_SECONDS,
        kind=RECORDED,
        worker=True,
    )
    """Seconds a read or write of OUT (or of an input) is retried through transient errors, such
    as an object store restarting, before the run stops (a re-run resumes it)."""
    commit_interval: float = option(
        "seconds between commits: each makes the rows finished since the last one durable (a killed "
        "driver loses at most this long of work) in a journal part (default %(default)g)",
        2.0,
        kind=RECORDED,
        metavar="S",
    )
    index_interval: float = option(
        f"seconds index/ may lag the commits: it gains one part of the journal's rows this often, or "
        f"per {FOLD_ROWS:,} rows, sooner early in a run (default %(default)g; cogdist.sink.journal)",
        DEFAULT_INDEX_INTERVAL,
        kind=RECORDED,
        metavar="S",
    )
    step_checkpoint: int | None = option(
        "video models: save the denoising state every N steps so a killed item resumes mid-way "
        f"(default: every {CHECKPOINT_SECONDS:.0f}s of an item's denoising; 0: never)",
        None,
        kind=RECORDED,
        worker=True,
        metavar="N",
    )
    """Video models: save the denoising state to OUT every N steps, so that a render killed mid-item
    resumes from its last checkpoint. None: every CHECKPOINT_SECONDS of an item's denoising (only
    long items are saved); 0: never."""
    progress: bool = option("no progress bar", True, flag="--no-progress")
    width: int | None = option(
        "default width (model's default otherwise)", None, kind=OUTPUT, group=ROW_DEFAULTS, spec_field="width"
    )
    height: int | None = option("default height", None, kind=OUTPUT, group=ROW_DEFAULTS, spec_field="height")
    steps: int | None = option(
        "default num_inference_steps", None, kind=OUTPUT, group=ROW_DEFAULTS, spec_field="num_inference_steps"
    )
    guidance: float | None = option(
        "default guidance_scale", None, kind=OUTPUT, group=ROW_DEFAULTS, spec_field="guidance_scale"
    )
    frames: int | None = option(
        "default num_frames (video models)", None, kind=OUTPUT, group=ROW_DEFAULTS, spec_field="num_frames"
    )
    fps: float | None = option(
        "default frames per second of the MP4s (video models)",
        None,
        kind=OUTPUT,
        group=ROW_DEFAULTS,
        spec_field="fps",
    )
    allow_pickle: bool = option(
        "load .bin/.pt pickle weights (can run code when loaded; only for checkpoints you trust)",
        False,
        kind=RECORDED,
        flag="--allow-pickle-weights",
        group="trust",
    )
    trust_remote_code: bool = option(
        "let diffusers import Python code that ships with the checkpoint (only for code you trust)",
        False,
        kind=RECORDED,
        group="trust",
    )
    column_map: str | None = option(
        "read manifest columns under cogdist's names, e.g. id=key,prompt=caption,image=url (the index "
        "keeps the manifest's names too)",
        None,
        kind=OUTPUT,
        group="manifest",
        metavar="NAME=COLUMN,...",
        record=lambda value, spec: column_map_record(value),
    )
    lora: tuple[str, ...] = option(
        "a LoRA adapter: SOURCE[,scale=S][,name=N][,weight_name=F], SOURCE a local folder or file "
        "(on every node), s3:// / gs:// URI or Hub repo id; repeatable",
        (),
        kind=OUTPUT,
        worker=True,
        group="adapters",
        metavar="SOURCE[,KEY=VALUE...]",
        record=lambda value, spec: lora_record(value),
    )
    fuse_lora: bool | None = option(
        "fuse the adapters into the weights (default: fused, unless the manifest has a lora column; "
        "fused and unfused round differently)",
        None,
        kind=OUTPUT,
        worker=True,
        group="adapters",
    )

    def __post_init__(self) -> None:
        # The API takes one adapter as a string, or a list of them; the CLI gives None for none.
        lora = (self.lora,) if isinstance(self.lora, str) else tuple(self.lora or ())
        object.__setattr__(self, "lora", lora)

    @property
    def gang_size(self) -> int:
        """Workers (GPUs) per replica."""
        return self.sp * (2 if self.cfg_parallel else 1)

    def check(self, spec: ModelSpec) -> None:
        """Raise UsageError for an option that cannot work with `spec`."""
        positive = {
            "--sp": self.sp,
            "--batch-size": self.batch_size,
            "--samples": self.samples,
            "--max-in-flight": self.max_in_flight,
            "--replicas": self.replicas if self.replicas is not None else 1,
            "--steps": self.steps if self.steps is not None else 1,
            "--max-gang-restarts": self.max_gang_restarts + 1,
            "--max-replicas": self.max_replicas if self.max_replicas is not None else 1,
        }
        check_layout(spec, self.sp, self.cfg_parallel)
        spec.check_prior_batch(self.prior_batch, self.batch_size)
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.max_retries < 0:
            raise UsageError(f"--max-retries must be >= 0, got {self.max_retries}")
        check_output_format(spec, self.format, self.quality)
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.guidance is not None and not abs(self.guidance) < float("inf"):
            raise UsageError(f"--guidance must be a finite number, got {self.guidance}")
        cache = (self.cache, self.cache_threshold)
        check_step_cache(spec.family, spec.name, *cache, gang_size=self.gang_size, batch_size=self.batch_size)
        check_step_checkpoint(spec, self.step_checkpoint, cached=self.cache != NO_CACHE)
        check_attention_backend(self.attention_backend, self.sp)
        check_compile(self.compile, self.cache)
        check_offload(self.offload, self.gang_size, self.compile)
        check_quantize(self.quantize, self.quantize_text_encoder, self.offload)
        check_lora(spec, self.lora, self.fuse_lora, self.quantize)
        check_dataset(self.dataset, self.shard_size, self.save_frames)
        seconds = {
            "--capacity-timeout": self.capacity_timeout,
            "--storage-timeout": self.storage_timeout,
            "--collective-timeout": self.collective_timeout,
            "--commit-interval": self.commit_interval,
            "--index-interval": self.index_interval,
        }
        check_limits(positive, seconds)
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise UsageError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        spec.check_row_defaults(self.frames, self.fps, self.save_frames)

    def resolved(self, spec: ModelSpec) -> RenderOptions:
        """These options with every per-model default filled in (format, quality, memory, row
        defaults: every option whose None stands for the model's value)."""
        fmt = self.format or ("mp4" if spec.kind == "video" else "png")
        from_model = {
            name: getattr(spec, how.spec_field)
            for name, _, _, how in declared()
            if how.spec_field and getattr(self, name) is None
        }
        return replace(
            self,
            **from_model,
            format=fmt,
            quality=self.quality or DEFAULT_QUALITY[fmt],
            cache_threshold=FIRST_BLOCK_THRESHOLD
            if self.cache == FIRST_BLOCK and self.cache_threshold is None
            else self.cache_threshold,
            # A step checkpoint cannot hold the cache's state (see check): none by default.
            step_checkpoint=0
            if self.cache != NO_CACHE and self.step_checkpoint is None
            else self.step_checkpoint,
        )

    def row_defaults(self) -> dict[str, Any]:
        """ModelSpec field -> the value given for it (None: the model's), for `with_defaults`."""
        return {
            how.spec_field: getattr(self, name) for name, _, _, how in declared() if how.group == ROW_DEFAULTS
        }

    def job_settings(self, spec: ModelSpec, columns: list[str]) -> JobSettings:
        """The job record of these (resolved) options with `spec` and the manifest's `columns`."""
        settings: dict[str, Any] = {}
        recorded: dict[str, Any] = {}
        for name, _, _, how in declared():
            value = getattr(self, name)
            if how.kind == OUTPUT:
                settings[how.spec_field or name] = how.record(value, spec) if how.record else value
            elif how.kind == RECORDED:
                recorded[name] = value
        settings["columns"] = list(columns)
        return JobSettings(settings, job_flags(), recorded)

    def worker_values(self) -> dict[str, Any]:
        """The options every worker receives (Option.worker), by WorkerSettings field."""
        return {
            name: bool(getattr(self, name)) if annotation == "bool | None" else getattr(self, name)
            for name, annotation, _, how in declared()
            if how.worker
        }
