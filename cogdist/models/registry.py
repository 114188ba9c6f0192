"""Model presets and name resolution. Plain data: importing this does not import torch.

A MODEL given by the user is one of:
- a preset name (`tiny-cogview4`, `THUDM/CogVideoX-5b`, ...) with known defaults and limits;
- a local folder holding `model_index.json` (for example a pipeline saved with
  `save_pretrained`), whose family, tasks and structural limits are read from its config files;
- any other Hugging Face repo id, whose config files are fetched (no weights) to do the same.

What a row asks for (its *task*) follows from the model and the row's input columns: a
text-to-video model renders rows with a `video` as video-to-video, an image-to-video model needs
an `image` on every row, and so on (`ModelSpec.task_for`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from cogdist.errors import ModelError
from cogdist.models.trust import check_folder_index, check_index

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


@dataclass(frozen=True)
class ModelSpec:
    """Everything the driver needs to know about a model before any worker loads it."""

    name: str
    """As the user wrote it: preset name, repo id or folder."""
    family: str
    """Model-family module under cogdist/models/ that runs it."""
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
    cpu_offload: bool = False
    """Default of --cpu-offload: keep only the running component on the GPU."""
    heads: int = 0
    """Attention heads of the transformer (0: unknown), which bound the sequence-parallel degree."""
    negative_prompt: bool = True
    """Whether the pipeline takes a negative prompt (GLM-Image has none)."""
    description: str = ""
    allow_pickle: bool = False
    """Load .bin/.pt pickle weights of a component that has no safetensors (--allow-pickle-weights)."""
    trust_remote_code: bool = False
    """Let diffusers import Python code that ships with the checkpoint (--trust-remote-code)."""

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

    def describe_tasks(self) -> str:
        parts = []
        for task in self.tasks:
            column = TASK_INPUT[task]
            parts.append(f"{task} ({f'rows with {column!r}' if column else 'prompt only'})")
        return ", ".join(parts)


# -- presets ---------------------------------------------------------------------------------

TINY_VIDEO_SIZES = SizeRule(multiple=16, min_side=32, max_side=256)
TINY_VIDEO_FRAMES = FrameRule(step=4, min_frames=1, max_frames=33)


def _cogview4_presets() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="tiny-cogview4",
            family="cogview4",
            source="",
            kind="image",
            tasks=(TEXT_TO_IMAGE,),
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=5.0,
            sizes=SizeRule(multiple=32, min_side=64, max_side=512),
            tiny=True,
            description="CogView4 architecture, random weights, about 0.1 M parameters (CPU friendly)",
        ),
        ModelSpec(
            name="THUDM/CogView4-6B",
            family="cogview4",
            source="THUDM/CogView4-6B",
            kind="image",
            tasks=(TEXT_TO_IMAGE,),
            width=1024,
            height=1024,
            num_inference_steps=50,
            guidance_scale=3.5,
            sizes=SizeRule(multiple=32, min_side=512, max_side=2048, max_area=2**21),
            description="CogView4 6B text-to-image (GLM-4-9B text encoder)",
        ),
    ]


def _cogvideox_presets() -> list[ModelSpec]:
    tiny = dict(
        family="cogvideox",
        source="",
        kind="video",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=6.0,
        sizes=TINY_VIDEO_SIZES,
        num_frames=9,
        frames=TINY_VIDEO_FRAMES,
        fps=8.0,
        tiny=True,
        vae_tiling=True,
        vae_slicing=True,
    )
    v10_sizes = SizeRule(multiple=16, min_side=480, max_side=720, only=((720, 480),))
    v10_frames = FrameRule(step=4, min_frames=9, max_frames=49, only=(49,))
    v10 = dict(
        family="cogvideox",
        kind="video",
        width=720,
        height=480,
        num_inference_steps=50,
        guidance_scale=6.0,
        sizes=v10_sizes,
        num_frames=49,
        frames=v10_frames,
        fps=8.0,
        vae_tiling=True,
        vae_slicing=True,
    )
    # CogVideoX-Fun was trained at several resolutions (512..1280) on 49 frames at 8 fps.
    fun = {
        **v10,
        "sizes": SizeRule(multiple=16, min_side=256, max_side=1360),
        "frames": FrameRule(max_frames=49),
    }
    v15_frames = FrameRule(step=4, min_frames=9, max_frames=161, only=(81, 161), latent_multiple=2)
    v15 = dict(
        family="cogvideox",
        kind="video",
        width=1360,
        height=768,
        num_inference_steps=50,
        guidance_scale=6.0,
        num_frames=81,
        frames=v15_frames,
        fps=16.0,
        vae_tiling=True,
        vae_slicing=True,
    )
    return [
        ModelSpec(
            name="tiny-cogvideox",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            variant="t2v",
            description="CogVideoX 1.0 architecture (rotary, DPM scheduler as in CogVideo's demo), random weights",
            **tiny,
        ),
        ModelSpec(
            name="tiny-cogvideox1.5",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            variant="t2v-1.5",
            description="CogVideoX 1.5 traits (temporal patch 2, 16 fps), random weights",
            **{
                **tiny,
                "fps": 16.0,
                "frames": replace(TINY_VIDEO_FRAMES, latent_multiple=2),
                "num_frames": 9,
            },
        ),
        ModelSpec(
            name="tiny-cogvideox-i2v",
            tasks=(IMAGE_TO_VIDEO,),
            variant="i2v",
            description="CogVideoX image-to-video architecture, random weights",
            **tiny,
        ),
        ModelSpec(
            name="tiny-cogvideox-fun",
            tasks=(CONTROL_TO_VIDEO,),
            variant="fun",
            description="CogVideoX-Fun control architecture (DDIM scheduler), random weights",
            **tiny,
        ),
        ModelSpec(
            name="THUDM/CogVideoX-2b",
            source="THUDM/CogVideoX-2b",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            dtype_gpu="float16",
            description="CogVideoX 2B text-to-video and video-to-video, 49 frames 720x480 at 8 fps",
            **v10,
        ),
        ModelSpec(
            name="THUDM/CogVideoX-5b",
            source="THUDM/CogVideoX-5b",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            description="CogVideoX 5B text-to-video and video-to-video, 49 frames 720x480 at 8 fps",
            **v10,
        ),
        ModelSpec(
            name="THUDM/CogVideoX-5b-I2V",
            source="THUDM/CogVideoX-5b-I2V",
            tasks=(IMAGE_TO_VIDEO,),
            description="CogVideoX 5B image-to-video, 49 frames 720x480 at 8 fps",
            **v10,
        ),
        ModelSpec(
            name="THUDM/CogVideoX1.5-5B",
            source="THUDM/CogVideoX1.5-5B",
            tasks=(TEXT_TO_VIDEO, VIDEO_TO_VIDEO),
            sizes=SizeRule(multiple=16, min_side=768, max_side=1360, only=((1360, 768),)),
            description="CogVideoX 1.5 5B text-to-video, 81 or 161 frames 1360x768 at 16 fps",
            **v15,
        ),
        ModelSpec(
            name="THUDM/CogVideoX1.5-5B-I2V",
            source="THUDM/CogVideoX1.5-5B-I2V",
            tasks=(IMAGE_TO_VIDEO,),
            sizes=SizeRule(multiple=16, min_side=768, max_side=1360, short_side=768),
            description="CogVideoX 1.5 5B image-to-video, 81 or 161 frames, shorter side 768, at 16 fps",
            **v15,
        ),
        ModelSpec(
            name="alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose",
            source="alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose",
            tasks=(CONTROL_TO_VIDEO,),
            description="CogVideoX-Fun 2B pose control: a control video in, 49 frames at 8 fps",
            **fun,
        ),
        ModelSpec(
            name="alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose",
            source="alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose",
            tasks=(CONTROL_TO_VIDEO,),
            description="CogVideoX-Fun 5B pose control: a control video in, 49 frames at 8 fps",
            **fun,
        ),
    ]


def _glm_image_presets() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="tiny-glm-image",
            family="glm_image",
            source="",
            kind="image",
            tasks=(TEXT_TO_IMAGE, IMAGE_TO_IMAGE),
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=1.5,
            sizes=SizeRule(multiple=32, min_side=32, max_side=256),
            tiny=True,
            negative_prompt=False,
            description="GLM-Image architecture (autoregressive prior + diffusion decoder), random weights",
        ),
        ModelSpec(
            name="zai-org/GLM-Image",
            family="glm_image",
            source="zai-org/GLM-Image",
            kind="image",
            tasks=(TEXT_TO_IMAGE, IMAGE_TO_IMAGE),
            width=1024,
            height=1024,
            num_inference_steps=50,
            guidance_scale=1.5,
            sizes=SizeRule(multiple=32, min_side=512, max_side=2048),
            negative_prompt=False,
            description="GLM-Image: autoregressive prior (GLM) + DiT decoder; text- and image-to-image",
        ),
    ]


# Transformer attention heads of the presets (tests/data/checkpoints holds the real configs).
_HEADS = {
    "THUDM/CogView4-6B": 32,
    "THUDM/CogVideoX-2b": 30,
    "alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose": 30,
    "zai-org/GLM-Image": 32,
}
TINY_HEADS = 6
COGVIDEOX_5B_HEADS = 48

PRESETS: dict[str, ModelSpec] = {
    spec.name: replace(spec, heads=TINY_HEADS if spec.tiny else _HEADS.get(spec.name, COGVIDEOX_5B_HEADS))
    for spec in _cogview4_presets() + _cogvideox_presets() + _glm_image_presets()
}

# model_index.json `_class_name` -> (family, tasks)
PIPELINE_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "CogView4Pipeline": ("cogview4", (TEXT_TO_IMAGE,)),
    "CogVideoXPipeline": ("cogvideox", (TEXT_TO_VIDEO, VIDEO_TO_VIDEO)),
    "CogVideoXVideoToVideoPipeline": ("cogvideox", (TEXT_TO_VIDEO, VIDEO_TO_VIDEO)),
    "CogVideoXImageToVideoPipeline": ("cogvideox", (IMAGE_TO_VIDEO,)),
    "CogVideoXFunControlPipeline": ("cogvideox", (CONTROL_TO_VIDEO,)),
    "GlmImagePipeline": ("glm_image", (TEXT_TO_IMAGE, IMAGE_TO_IMAGE)),
}


# -- unlisted checkpoints: limits read from their configs -----------------------------------


def _vae_scale(vae: dict) -> int:
    return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def _cogview4_from_configs(name: str, source: str, tasks: tuple, read: Callable[[str], dict]) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    multiple = _vae_scale(vae) * transformer.get("patch_size", 2)
    default_side = transformer.get("sample_size", 128) * _vae_scale(vae)
    return ModelSpec(
        name=name,
        family="cogview4",
        source=source,
        kind="image",
        tasks=tasks,
        width=default_side,
        height=default_side,
        num_inference_steps=50,
        guidance_scale=5.0,
        sizes=SizeRule(multiple=multiple, min_side=multiple, max_side=4096),
        heads=transformer.get("num_attention_heads", 0),
        description="CogView4 checkpoint (not a preset: sizes checked structurally only)",
    )


def _cogvideox_from_configs(name: str, source: str, tasks: tuple, read: Callable[[str], dict]) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    scale = _vae_scale(vae)
    patch_t = transformer.get("patch_size_t") or 1
    multiple = scale * transformer.get("patch_size", 2)
    temporal = vae.get("temporal_compression_ratio", 4)
    latent_channels = vae.get("latent_channels", 16)
    if TEXT_TO_VIDEO in tasks and transformer.get("in_channels") == 2 * latent_channels:
        # CogVideoX-Fun control checkpoints ship a CogVideoXPipeline index; their transformer
        # takes the control video's latents beside the noise.
        tasks = (CONTROL_TO_VIDEO,)
    if patch_t > 1:  # CogVideoX 1.5: its configs say 300x300 latents, it was trained at 1360x768
        width, height, frames, fps = 1360, 768, 81, 16.0
    else:
        width = transformer.get("sample_width", 90) * scale
        height = transformer.get("sample_height", 60) * scale
        frames, fps = transformer.get("sample_frames", 49), 8.0
    sizes = SizeRule(multiple=multiple, min_side=multiple, max_side=4096)
    if transformer.get("use_learned_positional_embeddings"):  # positions learned for one size only
        sizes = replace(sizes, only=((width, height),))
    return ModelSpec(
        name=name,
        family="cogvideox",
        source=source,
        kind="video",
        tasks=tasks,
        width=width,
        height=height,
        num_inference_steps=50,
        guidance_scale=6.0,
        sizes=sizes,
        num_frames=frames,
        frames=FrameRule(step=temporal, min_frames=1, max_frames=1024, latent_multiple=patch_t),
        fps=fps,
        vae_tiling=True,
        vae_slicing=True,
        heads=transformer.get("num_attention_heads", 0),
        description="CogVideoX checkpoint (not a preset: sizes and frames checked structurally only)",
    )


def _glm_image_from_configs(name: str, source: str, tasks: tuple, read: Callable[[str], dict]) -> ModelSpec:
    vae = read("vae/config.json")
    transformer = read("transformer/config.json")
    # The AR prior works on a 32-pixel token grid; the decoder needs vae_scale * patch_size * 2.
    multiple = max(32, _vae_scale(vae) * transformer.get("patch_size", 2) * 2)
    return ModelSpec(
        name=name,
        family="glm_image",
        source=source,
        kind="image",
        tasks=tasks,
        width=1024,
        height=1024,
        num_inference_steps=50,
        guidance_scale=1.5,
        sizes=SizeRule(multiple=multiple, min_side=multiple, max_side=4096),
        negative_prompt=False,
        heads=transformer.get("num_attention_heads", 0),
        description="GLM-Image checkpoint (not a preset: sizes checked structurally only)",
    )


_FROM_CONFIGS = {
    "cogview4": _cogview4_from_configs,
    "cogvideox": _cogvideox_from_configs,
    "glm_image": _glm_image_from_configs,
}


def resolve_model(name: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSpec:
    """Turn a MODEL argument into a ModelSpec, or raise ModelError saying what was tried.

    A checkpoint whose loading would import code that ships with it, or (a folder) unpickle its
    weights, is refused unless the matching opt-in is given; the spec carries the opt-ins to the
    workers, which check the files again before loading (`cogdist.models.trust`).
    """
    opt_ins = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if name in PRESETS:
        return replace(PRESETS[name], **opt_ins)
    folder = name[len("file://") :] if name.startswith("file://") else name
    if os.path.isdir(folder):
        folder = os.path.abspath(folder)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelError(f"model folder {folder} has no model_index.json (save one with save_pretrained)")

        def read_local(rel: str) -> dict:
            with open(os.path.join(folder, rel)) as f:
                return json.load(f)

        spec = spec_from_index(name, folder, read_local, trust_remote_code=trust_remote_code)
        check_folder_index(name, folder, **opt_ins)
        return replace(spec, **opt_ins)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return replace(
            spec_from_index(name, name, _hub_reader(name), trust_remote_code=trust_remote_code), **opt_ins
        )
    raise ModelError(
        f"unknown model {name!r}: not a preset (run `cogdist models`), not a folder with "
        "model_index.json, and not a Hugging Face repo id (owner/name)"
    )


def spec_from_index(
    name: str, source: str, read: Callable[[str], dict], *, trust_remote_code: bool = False
) -> ModelSpec:
    """The spec of a checkpoint that is not a preset, from its configs (`read(rel) -> dict`)."""
    try:
        index = read("model_index.json")
    except ModelError:
        raise
    except Exception as e:  # JSON or I/O trouble: say which file
        raise ModelError(f"cannot read model_index.json of {name}: {e}") from e
    check_index(name, index, trust_remote_code=trust_remote_code)
    class_name = index.get("_class_name", "")
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ModelError(
            f"model {name} is a {class_name or 'pipeline of unknown class'}; cogdist runs {known}"
        )
    family, tasks = PIPELINE_FAMILIES[class_name]
    try:
        return _FROM_CONFIGS[family](name, source, tasks, read)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ModelError(f"cannot read the configs of {name}: {e}") from e


def _hub_reader(repo_id: str) -> Callable[[str], dict]:
    def read(rel: str) -> dict:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id, rel)
        except Exception as e:
            raise ModelError(
                f"cannot fetch {rel} of Hugging Face repo {repo_id!r}: {type(e).__name__}: {e}. "
                "Check the name, your network and HF_TOKEN, or pass a local folder."
            ) from e
        with open(path) as f:
            return json.load(f)

    return read


def with_defaults(spec: ModelSpec, **overrides: object) -> ModelSpec:
    """`spec` with job-level default overrides (None values ignored)."""
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})
