"""RenderOptions: every knob of a render, validated before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cogdist.errors import UsageError
from cogdist.models.layout import check_layout
from cogdist.models.registry import ModelSpec
from cogdist.sink.dataset import DATASETS, DEFAULT_SHARD_SIZE, FILES
from cogdist.sink.encode import DEFAULT_QUALITY, IMAGE_FORMATS, VIDEO_FORMATS
from cogdist.storage import RETRY_SECONDS
from cogdist.worker.cache import FIRST_BLOCK, FIRST_BLOCK_THRESHOLD, NO_CACHE, check_step_cache
from cogdist.worker.worker import DTYPES


@dataclass(frozen=True)
class RenderOptions:
    manifest: str
    """Parquet file, folder or glob; local path or object-store URI."""
    model: str
    """Preset name, Hugging Face repo id, or folder holding model_index.json."""
    out: str
    """Output folder or object-store prefix."""
    replicas: int | None = None
    """Gangs rendering in parallel. Default: one per GPU (divided by --sp), or 2 without GPUs."""
    sp: int = 1
    """Sequence-parallel degree: GPUs sharing one sample's tokens."""
    cfg_parallel: bool = False
    """Run the conditional and unconditional passes on two halves of the gang (2 x sp GPUs)."""
    batch_size: int = 1
    """Rows of one shape rendered by one pipeline call."""
    max_in_flight: int = 2
    """Units queued per replica, so that it never waits for the driver between units."""
    max_retries: int = 2
    """Renders retried after an error before a row is recorded under failures/."""
    format: str | None = None
    """Output format: png, jpeg or webp for images (default png); mp4 for videos."""
    quality: int | None = None
    """JPEG/WebP quality, or MP4 quality (1..100, mapped to H.264 CRF; default 65 = CRF 18)."""
    width: int | None = None
    """Default width for rows that name none (the model's default otherwise)."""
    height: int | None = None
    steps: int | None = None
    """Default num_inference_steps for rows that name none."""
    guidance: float | None = None
    """Default guidance_scale for rows that name none."""
    frames: int | None = None
    """Default num_frames for rows of a video model that name none."""
    fps: float | None = None
    """Default frames per second of the MP4s for rows that name none (the model's otherwise)."""
    save_frames: bool = False
    """Video models: also write every frame as a PNG (`<output>.frames/000000.png`, ...)."""
    vae_tiling: bool | None = None
    """Decode latents in overlapping tiles (less memory). None: the model's default."""
    vae_slicing: bool | None = None
    """Decode a batch one sample at a time. None: the model's default."""
    cpu_offload: bool | None = None
    """Model CPU offload on GPUs (components move to the GPU only while they run). None: the model's
    default."""
    dtype: str = "auto"
    """Weights dtype: auto (the preset's: bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."""
    cache: str = NO_CACHE
    """Step cache on the transformer: none, first-block, taylorseer or pab (see cogdist.worker.cache).
    Fewer transformer computations; outputs differ slightly from uncached ones."""
    cache_threshold: float | None = None
    """--cache first-block: relative change of the first block's output below which the other
    blocks are skipped (default FIRST_BLOCK_THRESHOLD); higher skips more."""
    allow_pickle: bool = False
    """Load .bin/.pt pickle weights of a checkpoint that has no safetensors. Unpickling can run
    code: only for checkpoints you trust."""
    trust_remote_code: bool = False
    """Let diffusers import Python code that ships with the checkpoint (custom components). Only
    for checkpoints whose code you have read and trust."""
    address: str | None = None
    """Ray cluster to join; default: $RAY_ADDRESS, else a local instance started in process."""
    overwrite: bool = False
    """Start over: remove what a previous job wrote under OUT instead of resuming it."""
    retry_failed: bool = False
    """Render rows recorded under failures/ again instead of skipping them."""
    cpus_per_worker: float | None = None
    """Logical CPUs reserved per worker. Default: 1 with GPUs; a share of the node without."""
    collective_timeout: float = 600.0
    """Seconds a gang member waits for a peer in a collective before the gang is rebuilt (a hung
    GPU or process). Longer than any rank-0-only stage: text encoding, GLM-Image's AR prior."""
    storage_timeout: float = RETRY_SECONDS
    """Seconds a read or write of OUT (or of an input) is retried through transient errors, such
    as an object store restarting, before the run stops (a re-run resumes it)."""
    step_checkpoint: int | None = None
    """Video models: save the denoising state to OUT every N steps, so that a render killed mid-item
    resumes from its last checkpoint. None: every CHECKPOINT_SECONDS of an item's denoising (only
    long items are saved); 0: never."""
    max_gang_restarts: int = 3
    """Times a replica is rebuilt after its workers die before it is given up."""
    dataset: str = "files"
    """How outputs are stored: "files" (one file per row under outputs/), "webdataset" (tar shards
    under shards/) or "parquet" (Hugging Face datasets Parquet with the media embedded, under data/)."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """--dataset webdataset/parquet: samples per shard. Samples wait in the driver's memory until
    their shard is written; a killed run renders the unwritten ones again."""
    commit_interval: float = 2.0
    """Seconds between index commits (finished rows are committed in one Parquet part)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    @property
    def gang_size(self) -> int:
        """Workers (GPUs) per replica."""
        return self.sp * (2 if self.cfg_parallel else 1)

    def check(self, spec: ModelSpec) -> None:
        """Raise UsageError for an option that cannot work with `spec`."""
        positive = {
            "--sp": self.sp,
            "--batch-size": self.batch_size,
            "--max-in-flight": self.max_in_flight,
            "--replicas": self.replicas if self.replicas is not None else 1,
            "--steps": self.steps if self.steps is not None else 1,
            "--max-gang-restarts": self.max_gang_restarts + 1,
        }
        for flag, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        check_layout(spec, self.sp, self.cfg_parallel)
        if self.max_retries < 0:
            raise UsageError(f"--max-retries must be >= 0, got {self.max_retries}")
        formats = VIDEO_FORMATS if spec.kind == "video" else IMAGE_FORMATS
        if self.format is not None and self.format not in formats:
            raise UsageError(
                f"--format {self.format!r}: {spec.name} makes {spec.kind}s; choose {', '.join(formats)}"
            )
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise UsageError(f"--quality must be in 1..100, got {self.quality}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.guidance is not None and not abs(self.guidance) < float("inf"):
            raise UsageError(f"--guidance must be a finite number, got {self.guidance}")
        if not self.storage_timeout > 0:
            raise UsageError(f"--storage-timeout must be > 0 seconds, got {self.storage_timeout}")
        if self.step_checkpoint is not None:
            if self.step_checkpoint < 0:
                raise UsageError(f"--step-checkpoint must be >= 0 steps, got {self.step_checkpoint}")
            if self.step_checkpoint and spec.kind != "video":
                raise UsageError(
                    f"--step-checkpoint: {spec.name} renders an image in one short call; "
                    "step checkpoints are for video models"
                )
        check_step_cache(
            spec.family,
            spec.name,
            self.cache,
            self.cache_threshold,
            gang_size=self.gang_size,
            batch_size=self.batch_size,
        )
        if self.cache != NO_CACHE and self.step_checkpoint:
            # Tested: a resumed row restarts the cache's state and differs from an uninterrupted one.
            raise UsageError(
                "--step-checkpoint: a render resumed from a step checkpoint starts the step cache over, "
                "so its output would differ from an uninterrupted one: with --cache, step checkpoints "
                "are off (drop --step-checkpoint or --cache)"
            )
        if self.dataset not in DATASETS:
            raise UsageError(f"--dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.dataset != FILES and self.save_frames:
            raise UsageError(
                f"--save-frames writes files beside each video; not with --dataset {self.dataset}"
            )
        if not 0 < self.commit_interval < float("inf"):
            raise UsageError(f"--commit-interval must be > 0 seconds, got {self.commit_interval}")
        if not self.collective_timeout > 0:
            raise UsageError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise UsageError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        problem = spec.sizes.problem(spec.width, spec.height)
        if problem:
            raise UsageError(f"--width/--height: {problem} ({spec.name} takes {spec.sizes.describe()})")
        if spec.kind == "image":
            for flag, value in (
                ("--frames", self.frames),
                ("--fps", self.fps),
                ("--save-frames", self.save_frames),
            ):
                if value:
                    raise UsageError(f"{flag}: {spec.name} makes images")
        if self.fps is not None and not 0 < self.fps < float("inf"):
            raise UsageError(f"--fps must be > 0, got {self.fps}")
        if spec.frames is not None and spec.num_frames is not None:
            problem = spec.frames.problem(spec.num_frames)
            if problem:
                raise UsageError(f"--frames: {problem} ({spec.name} takes {spec.frames.describe()} frames)")

    def resolved(self, spec: ModelSpec) -> RenderOptions:
        """These options with every per-model default filled in (format, quality, memory)."""
        fmt = self.format or ("mp4" if spec.kind == "video" else "png")
        return replace(
            self,
            format=fmt,
            quality=self.quality or DEFAULT_QUALITY[fmt],
            vae_tiling=spec.vae_tiling if self.vae_tiling is None else self.vae_tiling,
            vae_slicing=spec.vae_slicing if self.vae_slicing is None else self.vae_slicing,
            cpu_offload=spec.cpu_offload if self.cpu_offload is None else self.cpu_offload,
            cache_threshold=FIRST_BLOCK_THRESHOLD
            if self.cache == FIRST_BLOCK and self.cache_threshold is None
            else self.cache_threshold,
            # A step checkpoint cannot hold the cache's state (see check): none by default.
            step_checkpoint=0
            if self.cache != NO_CACHE and self.step_checkpoint is None
            else self.step_checkpoint,
        )
