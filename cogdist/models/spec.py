"""What cogdist knows about models, as plain data: importing this does not import torch.

- `ModelSpec`: one resolved model (a preset or a checkpoint read from its configs), which the
  driver checks rows against and every worker receives;
- `FamilySpec`: one model family declared in one object (its presets, how a checkpoint's configs
  resolve to it, its pipelines, its parallel plans, its step caches...), which the registry,
  `parallel/`, `worker/` and the option checks read instead of naming the family;
- `FamilyRunner`: the torch side of a family (load a pipeline, render rows), which a
  FamilySpec reaches lazily, so the driver never imports torch to read a spec.

A family lives under `cogdist/models/<family>/`: its `__init__.py` holds the FamilySpec (no
torch), its `runner.py` the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cogdist.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from cogdist.inputs import Inputs
    from cogdist.work import WorkItem

# Tasks, and the input column each one needs (None: the prompt alone).
TEXT_TO_IMAGE = "text-to-image"
IMAGE_TO_IMAGE = "image-to-image"
TEXT_TO_VIDEO = "text-to-video"
IMAGE_TO_VIDEO = "image-to-video"
VIDEO_TO_VIDEO = "video-to-video"
CONTROL_TO_VIDEO = "control-to-video"
TASK_INPUT: dict[str, str | None] = {
    TEXT_TO_IMAGE: None,
    IMAGE_TO_IMAGE: "image",
    TEXT_TO_VIDEO: None,
    IMAGE_TO_VIDEO: "image",
    VIDEO_TO_VIDEO: "video",
    CONTROL_TO_VIDEO: "video",
}
DEFAULT_STRENGTH = 0.8  # diffusers' default for video-to-video


@dataclass(frozen=True)
class SizeRule:
    """Which output sizes a model takes."""

    multiple: int
    """Width and height must be multiples of this."""
    min_side: int
    max_side: int
    max_area: int | None = None
    """Upper bound on width * height, if the model has one."""
    short_side: int | None = None
    """The shorter side must be exactly this (CogVideoX 1.5 image-to-video)."""
    only: tuple[tuple[int, int], ...] = ()
    """When given, only these (width, height) pairs: checkpoints trained at one size."""

    def problem(self, width: int, height: int) -> str | None:
        """Why (width, height) is refused, or None when it is fine."""
        if self.only:
            if (width, height) in self.only:
                return None
            return f"{width}x{height} is not a size this model takes"
        for name, side in (("width", width), ("height", height)):
            if side % self.multiple:
                return f"{name} {side} is not a multiple of {self.multiple}"
            if not self.min_side <= side <= self.max_side:
                return f"{name} {side} is outside {self.min_side}..{self.max_side}"
        if self.max_area is not None and width * height > self.max_area:
            return f"width*height = {width * height} exceeds {self.max_area}"
        if self.short_side is not None and min(width, height) != self.short_side:
            return f"the shorter side is {min(width, height)}, not {self.short_side}"
        return None

    def describe(self) -> str:
        if self.only:
            return " or ".join(f"{w}x{h}" for w, h in self.only)
        text = f"multiples of {self.multiple} in {self.min_side}..{self.max_side}"
        if self.short_side:
            text += f", shorter side {self.short_side}"
        return text + (f", width*height <= {self.max_area}" if self.max_area else "")


@dataclass(frozen=True)
class FrameRule:
    """Which frame counts a CogVideoX model takes.

    The VAE packs `step` frames into a latent frame after the first, and decodes an odd number of
    latent frames back to (latents - 1) * step + 1 frames, but an even number to latents * step
    (its decoder runs in pairs of latent frames). A generated video therefore has 8k+1 frames;
    CogVideoX 1.5's temporal patch makes video inputs need an even latent count, so its
    video-to-video outputs hold 4 frames per latent frame.
    """

    step: int = 4
    """The VAE's temporal compression: frames must be step*k + 1."""
    min_frames: int = 1
    max_frames: int = 1024
    only: tuple[int, ...] = ()
    """When given, generated videos take only these lengths (checkpoints trained at them)."""
    latent_multiple: int = 1
    """The transformer's temporal patch: a video input's latent frames must divide by it (1.5: 2).
    Generated videos are padded by the pipeline instead."""

    def problem(self, frames: int, video_input: bool = False) -> str | None:
        if (frames - 1) % self.step:
            return f"{frames} frames is not {self.step}k+1"
        if not self.min_frames <= frames <= self.max_frames:
            return f"{frames} frames is outside {self.min_frames}..{self.max_frames}"
        latents = (frames - 1) // self.step + 1
        if video_input and self.latent_multiple > 1:
            if latents % self.latent_multiple:
                return (
                    f"{frames} frames make {latents} latent frames, not a multiple of "
                    f"{self.latent_multiple} (the model's temporal patch)"
                )
            return None
        if latents % 2 == 0:
            return (
                f"{frames} frames make {latents} latent frames, which the VAE decodes to "
                f"{latents * self.step}; use {2 * self.step}k+1 frames"
            )
        if not video_input and self.only and frames not in self.only:
            return f"{frames} frames is not one of {', '.join(map(str, self.only))}"
        return None

    def describe(self) -> str:
        if self.only:
            return " or ".join(map(str, self.only))
        return f"{2 * self.step}k+1 in {self.min_frames}..{self.max_frames}"


CPU_PARAMETERS = 1_000_000_000
"""Above this many transformer parameters a model never renders on CPUs under `--device auto`."""


def estimate_parameters(transformer_config: dict) -> int:
    """A transformer's parameters from its config: 12 x layers x width^2 (attention 4 w^2, MLP 8 w^2),
    within ~30% for CogView4 (6B), CogVideoX (2B, 5B) and GLM-Image's decoder."""
    layers = transformer_config.get("num_layers") or transformer_config.get("num_hidden_layers") or 0
    heads, head_dim = (
        transformer_config.get("num_attention_heads", 0),
        transformer_config.get("attention_head_dim", 0),
    )
    width = heads * head_dim or transformer_config.get("hidden_size", 0)
    return 12 * int(layers) * int(width) ** 2


@dataclass(frozen=True)
class ModelSpec:
    """Everything the driver needs to know about a model before any worker loads it."""

    name: str
    """As the user wrote it: preset name, repo id or folder."""
    family: str
    """Its family's key (`FamilySpec.name`): the package under cogdist/models/ that runs it."""
    source: str
    """What `from_pretrained` is given (repo id or absolute folder); empty for tiny presets."""
    kind: str
    """"image" or "video"."""
    tasks: tuple[str, ...]
    """What it renders; at most one task per input column (see TASK_INPUT)."""
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    sizes: SizeRule
    num_frames: int | None = None
    """Default frame count (video models)."""
    frames: FrameRule | None = None
    fps: float | None = None
    """Frames per second of the MP4s (video models); a manifest `fps` column overrides it."""
    tiny: bool = False
    """Random weights built in memory from a small config; no download."""
    variant: str = ""
    """Which tiny architecture the family module builds (tiny presets only)."""
    seed: int = 0
    """Seed of a tiny preset's weights: every process builds the same model."""
    dtype_gpu: str = "bfloat16"
    dtype_cpu: str = "float32"
    vae_tiling: bool = False
    """Default of --vae-tiling: decode in overlapping tiles (less memory; changes pixels slightly)."""
    vae_slicing: bool = False
    """Default of --vae-slicing: decode a batch one sample at a time."""
    offload: str = "none"
    """Default of --offload (cogdist.worker.offload): none, model, group or sequential."""
    heads: int = 0
    """Attention heads of the transformer (0: unknown), which bound the sequence-parallel degree."""
    negative_prompt: bool = True
    """Whether the pipeline takes a negative prompt (GLM-Image has none)."""
    ar_prior: bool = False
    """Whether the pipeline samples an autoregressive prior first (GLM-Image): what --prior-batch batches."""
    description: str = ""
    allow_pickle: bool = False
    """Load .bin/.pt pickle weights of a component that has no safetensors (--allow-pickle-weights)."""
    trust_remote_code: bool = False
    """Let diffusers import Python code that ships with the checkpoint (--trust-remote-code)."""
    weights: tuple[tuple[str, int], ...] = ()
    """(component, parameters) of a real preset, counted from its configs (transformer, VAE, AR
    prior: tests/data/checkpoints; text encoders: google/t5-v1_1-xxl's, THUDM/glm-4-9b-hf's):
    the memory `cogdist models` shows per --offload tier. Empty: not known."""
    parameters: int = 0
    """The transformer's parameters, estimated from its config (0: unknown, as for the presets of
    real checkpoints); see `fits_on_cpus`."""

    @property
    def fits_on_cpus(self) -> bool:
        """Small enough to render on CPUs when no GPU is there (`--device auto`): a tiny preset or a
        checkpoint of at most CPU_PARAMETERS parameters by its configs; never a real checkpoint."""
        return self.tiny or 0 < self.parameters <= CPU_PARAMETERS

    @property
    def conditioning(self) -> frozenset[str]:
        """Manifest input columns the model can use (`image`, `video`, `strength`)."""
        inputs = {TASK_INPUT[t] for t in self.tasks} - {None}
        if VIDEO_TO_VIDEO in self.tasks:
            inputs.add("strength")
        return frozenset(inputs)  # type: ignore[arg-type]

    def task_for(self, has_image: bool, has_video: bool) -> str | None:
        """The task of a row with these inputs, or None when the model has none for them."""
        if has_image and has_video:
            return None
        wanted = "image" if has_image else "video" if has_video else None
        return next((t for t in self.tasks if TASK_INPUT[t] == wanted), None)

    def check_row_defaults(self, frames: int | None, fps: float | None, save_frames: bool) -> None:
        """Refuse row defaults (--width/--height/--frames/--fps/--save-frames, already applied to
        this spec) that this model cannot render."""
        problem = self.sizes.problem(self.width, self.height)
        if problem:
            raise UsageError(f"--width/--height: {problem} ({self.name} takes {self.sizes.describe()})")
        if self.kind == "image":
            for flag, value in (("--frames", frames), ("--fps", fps), ("--save-frames", save_frames)):
                if value:
                    raise UsageError(f"{flag}: {self.name} makes images")
        if fps is not None and not 0 < fps < float("inf"):
            raise UsageError(f"--fps must be > 0, got {fps}")
        if self.frames is not None and self.num_frames is not None:
            problem = self.frames.problem(self.num_frames)
            if problem:
                raise UsageError(f"--frames: {problem} ({self.name} takes {self.frames.describe()} frames)")

    def check_prior_batch(self, prior_batch: int, batch_size: int) -> None:
        """Refuse a --prior-batch this model or the units (--batch-size rows) cannot use."""
        if prior_batch < 1:
            raise UsageError(f"--prior-batch must be at least 1, got {prior_batch}")
        if prior_batch == 1:
            return
        if not self.ar_prior:
            raise UsageError(f"--prior-batch: {self.name} has no autoregressive prior (GLM-Image has one)")
        if prior_batch > batch_size:
            raise UsageError(
                f"--prior-batch {prior_batch} batches the prior of a unit's rows, and --batch-size "
                f"{batch_size} puts {batch_size} in a unit: set --batch-size to at least {prior_batch}"
            )

    def describe_tasks(self) -> str:
        parts = []
        for task in self.tasks:
            column = TASK_INPUT[task]
            parts.append(f"{task} ({f'rows with {column!r}' if column else 'prompt only'})")
        return ", ".join(parts)


# -- what a family declares --------------------------------------------------------------------

# CFG-parallel modes (cogdist.parallel.cfg): how a pipeline's loop calls its transformer.
BATCHED = "batched"
"""One call per step on the batch [uncond; cond] (CogVideoX)."""
PAIRED = "paired"
"""Two calls per step, conditional first; the runner arms `cogdist.parallel.cfg.pairing`."""

# Step caches (`--cache`, cogdist.worker.cache).
NO_CACHE = "none"
FIRST_BLOCK = "first-block"
TAYLORSEER = "taylorseer"
PAB = "pab"
CACHE_KINDS = (NO_CACHE, FIRST_BLOCK, TAYLORSEER, PAB)

VIDEO_MEMORY_DEFAULTS: Mapping[str, bool] = {"vae_tiling": True, "vae_slicing": True}
"""ModelSpec defaults of video models: decode in tiles, one sample at a time (a video's VAE decode
is what runs out of memory first)."""

TOKEN_PIXELS = 16
"""Pixels per image-token side of an 8x VAE with 2x2 patches."""

ConfigReader = Callable[[str], dict]
"""Reads a checkpoint's config file (`"vae/config.json"`) as a dict."""


@dataclass(frozen=True)
class Split:
    """Split one input (or output, `split_output`) of a module over the ranks of a CFG half:
    plain data for diffusers' `ContextParallelInput`."""

    split_dim: int
    expected_dims: int
    split_output: bool = False


@dataclass(frozen=True)
class Gather:
    """Gather a module's output from the ranks of a CFG half: diffusers' `ContextParallelOutput`."""

    gather_dim: int
    expected_dims: int


TOKENS = Split(split_dim=1, expected_dims=3)
"""(batch, tokens, channels) tensors, split along the tokens."""
ROPE = Split(split_dim=0, expected_dims=2)
"""A rotary table (tokens, dim) passed as an argument."""
ROPE_OUTPUT = Split(split_dim=0, expected_dims=2, split_output=True)
"""A rotary table (tokens, dim) computed by the module: its output is split."""
GATHER = Gather(gather_dim=1, expected_dims=3)
"""(batch, tokens, channels) outputs, gathered along the tokens."""

PlanEntry = Mapping[str | int, Split | tuple[Split, ...]] | Gather
"""Per module: argument name (or output index) -> split(s), or the gather of its output."""


@dataclass(frozen=True)
class SequencePlan:
    """How sequence parallelism splits one transformer class (diffusers' `_cp_plan`, as data).

    `modules` maps module paths ("" for the transformer itself) to what is split on entry or
    gathered on exit; `cogdist.parallel.sequence` turns it into diffusers' objects.
    """

    modules: Mapping[str, PlanEntry]
    dispatch: tuple[str, ...] = ()
    """Python modules whose attention processors call `F.scaled_dot_product_attention` directly,
    which must go through diffusers' dispatcher, or each rank would attend within its shard only."""
    text_on_first_rank: str = ""
    """Module path of the block whose text tokens are not split but given whole to the first rank
    of the group (glyph tokens fewer than the ranks); needs the uneven mode."""


@runtime_checkable
class StepCheckpointer(Protocol):
    """Saves and resumes the denoising state of one pipeline call (cogdist.worker.checkpoint)."""

    def around(
        self, pipe: Any, items: Sequence[WorkItem], generators: Sequence
    ) -> AbstractContextManager[None]:
        """Checkpoint the stock pipeline call made inside this block for `items`."""
        ...


@runtime_checkable
class FamilyRunner(Protocol):
    """The torch side of a family: builds or loads its pipeline and renders rows with it."""

    def load(self, spec: ModelSpec, dtype: Any) -> Any:
        """The pipeline of `spec` on the CPU, in `dtype` (a torch.dtype); the worker places it."""
        ...

    def render(
        self,
        pipe: Any,
        items: Sequence[WorkItem],
        device: Any,
        inputs: Sequence[Inputs],
        *,
        gang: Any = None,
        checkpoints: StepCheckpointer | None = None,
    ) -> list[np.ndarray]:
        """Outputs (uint8 arrays) for `items`, which share one shape, in their order. In a gang
        (a GangGroup) every rank calls this with the same rows."""
        ...

    def prepare_inputs(self, item: WorkItem, inputs: Inputs) -> Inputs:
        """A row's decoded inputs fitted to the model, or InputError refusing the row."""
        ...


@dataclass(frozen=True)
class FamilySpec:
    """One model family, declared in one place (see the module docstring)."""

    name: str
    """The key: `ModelSpec.family` of its models, the package name under cogdist/models/."""
    presets: tuple[ModelSpec, ...]
    pipelines: Mapping[str, str]
    """Task -> the diffusers pipeline class that renders it."""
    index_classes: Mapping[str, tuple[str, ...]]
    """A checkpoint's model_index.json `_class_name` -> the tasks it renders."""
    from_configs: Callable[[str, str, tuple[str, ...], ConfigReader], ModelSpec]
    """The spec of a checkpoint that is no preset: (name, source, tasks, read) -> ModelSpec."""
    runner: Callable[[], FamilyRunner]
    """Imports and returns its FamilyRunner (the torch side), called by `load_runner` only: a
    function whose body imports the family's runner module, so reading a spec imports no torch."""
    cfg_parallel: str
    """How its pipelines call the transformer per step: BATCHED or PAIRED."""
    sequence_plans: Mapping[str, SequencePlan] = field(default_factory=dict)
    """Transformer class name -> its sequence-parallel plan."""
    vae_tiles: Mapping[str, str] = field(default_factory=dict)
    """VAE class name -> the tiled decode that `cogdist.parallel.vae` spreads over a gang
    (one of its TILED_DECODES); exact classes, as a subclass may tile differently."""
    first_rank_models: tuple[str, ...] = ()
    """Pipeline components that run only in rank 0's stages of a gang, dropped on the others."""
    step_caches: tuple[str, ...] = ()
    """The `--cache` kinds that work with its pipelines."""
    no_step_cache: Mapping[str, str] = field(default_factory=dict)
    """Why each other cache kind does not (the error message's reason)."""
    step_checkpoints: bool = False
    """Long denoising loops: its runner saves and resumes their state when given checkpoints."""
    no_lora: str | None = None
    """Why its pipelines take no LoRA adapters (--lora); None: diffusers' LoRA loaders load them."""
    token_pixels: int = TOKEN_PIXELS
    """Pixels per image-token side, which bounds the sequence-parallel degree of small outputs."""

    def load_runner(self) -> FamilyRunner:
        """Import the family's torch side."""
        runner = self.runner()
        if not isinstance(runner, FamilyRunner):
            raise TypeError(f"the {self.name} family's runner {runner!r} is not a FamilyRunner")
        return runner


def vae_scale(vae: dict) -> int:
    """The spatial scale of a VAE, from its config."""
    return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
