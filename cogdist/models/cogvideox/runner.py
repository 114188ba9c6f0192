"""CogVideoX, its torch side: text-to-video, video-to-video, image-to-video and Fun control.

One checkpoint serves one or two tasks: a text-to-video checkpoint also renders video-to-video
(the same components in `CogVideoXVideoToVideoPipeline`), an I2V checkpoint renders
image-to-video, a Fun control checkpoint renders control-to-video. The stock pipelines run the
denoising loop; rendering feeds them what makes each row independent of its batch:
- prompts are encoded one row at a time (T5 pads every prompt to 226 tokens, so this only costs
  a few small encoder calls and keeps batched rows bit-for-bit what they are alone);
- every random draw of a row comes from its own `torch.Generator("cpu").manual_seed(seed)`,
  passed as a per-row list: the VAE posterior sample of an input image or video, the initial
  noise and the DPM scheduler's per-step noise, in the stock pipeline's order.
So a row's video equals `Pipeline(...)(prompt, ..., generator=Generator("cpu").manual_seed(seed))`
with the same VAE tiling/slicing settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXTransformer3DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import T5Config, T5EncoderModel

from cogdist.inputs import Inputs
from cogdist.models.cogvideox import SPEC
from cogdist.models.loading import from_pretrained
from cogdist.models.prompts import prompt_cache
from cogdist.models.spec import (
    CONTROL_TO_VIDEO,
    IMAGE_TO_VIDEO,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    ModelSpec,
    StepCheckpointer,
)
from cogdist.models.tiny import tiny_tokenizer
from cogdist.parallel.broadcast import on_first_rank
from cogdist.parallel.group import GangGroup
from cogdist.work import WorkItem

# The stock pipeline of each task, as the spec names them.
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    task: getattr(diffusers, name) for task, name in SPEC.pipelines.items()
}

# Tiny architectures: variant -> (first task, transformer overrides, scheduler class).
_TINY_VARIANTS = {
    "t2v": (TEXT_TO_VIDEO, {}, CogVideoXDPMScheduler),
    "t2v-1.5": (TEXT_TO_VIDEO, {"patch_size_t": 2, "patch_bias": False}, CogVideoXDPMScheduler),
    "i2v": (IMAGE_TO_VIDEO, {"in_channels": 8}, CogVideoXDPMScheduler),  # noise + image latents
    "fun": (CONTROL_TO_VIDEO, {"in_channels": 8}, CogVideoXDDIMScheduler),  # noise + control latents
}
LATENT_CHANNELS = 4


def build_tiny(variant: str = "t2v", seed: int = 0) -> DiffusionPipeline:
    """A CogVideoX architecture at toy size with random weights, identical in every process."""
    task, overrides, scheduler_class = _TINY_VARIANTS[variant]
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                decoder_start_token_id=0,
                # Large embeddings so that the prompt visibly changes the video.
                initializer_factor=4.0,
            )
        )
        transformer = CogVideoXTransformer3DModel(
            **{
                "num_attention_heads": 6,  # divisible by 2 and 3: room for sequence-parallel degrees
                "attention_head_dim": 16,  # rotary splits it 4/6/6 over time/height/width
                "in_channels": LATENT_CHANNELS,
                "out_channels": LATENT_CHANNELS,
                "time_embed_dim": 16,
                "text_embed_dim": 32,
                "num_layers": 2,
                "sample_width": 8,  # 64 pixels
                "sample_height": 8,
                "sample_frames": 9,
                "patch_size": 2,
                "temporal_compression_ratio": 4,
                "max_text_seq_length": 226,
                "use_rotary_positional_embeddings": True,
                **overrides,
            }
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,  # 8x spatial, 4x temporal like the real VAE
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            # Tiles of 48x40 px (half these), whose overlaps divide evenly as at the real 240x360
            # tiles: tiled decoding, on by default for CogVideoX, really tiles at 64 px.
            sample_height=96,
            sample_width=80,
        )
    scheduler = scheduler_class(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
    )
    for module in (text_encoder, transformer, vae):
        module.eval()
    return PIPELINES[task](
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_pipeline(spec: ModelSpec, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline of the model's first task, on the CPU; the worker places it."""
    if spec.tiny:
        pipe = build_tiny(spec.variant, spec.seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return pipe
    return from_pretrained(PIPELINES[spec.tasks[0]], spec, dtype)


@torch.no_grad()
def render(
    pipe: DiffusionPipeline,
    items: Sequence[WorkItem],
    device: torch.device,
    inputs: Sequence,
    gang: GangGroup | None = None,
    checkpoints: StepCheckpointer | None = None,
) -> list[np.ndarray]:
    """Videos (uint8, frames x height x width x 3) for `items`, which share one shape and task.

    In a gang, prompts are encoded on its first rank only. With `checkpoints`, each pipeline call
    saves its denoising state as it goes and resumes from what an interrupted call saved.
    """
    first = items[0]
    task_pipe = _for_task(pipe, first.task)
    cfg = first.guidance_scale > 1
    prompts = prompt_cache(pipe)

    def encode(item: WorkItem) -> tuple:
        return prompts.get(
            (item.prompt, item.negative_prompt, cfg),
            lambda: task_pipe.encode_prompt(item.prompt, item.negative_prompt, cfg, device=device),
        )

    encoded = on_first_rank(gang, lambda: [encode(item) for item in items])
    videos: list[np.ndarray] = []
    for call in _calls(task_pipe, items):
        positive = [encoded[index][0] for index in call]
        negative = [encoded[index][1] for index in call]
        generators = [torch.Generator("cpu").manual_seed(items[i].seed) for i in call]
        kwargs = dict(
            prompt_embeds=torch.cat(positive),
            negative_prompt_embeds=torch.cat(negative) if cfg else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="np",
        )
        if first.task == VIDEO_TO_VIDEO:
            # One video goes in as its list of frames, several as a list of lists (see _calls).
            video = inputs[call[0]].video if len(call) == 1 else [inputs[i].video for i in call]
            kwargs.update(video=video, strength=first.strength)
        elif first.task == CONTROL_TO_VIDEO:
            kwargs.update(control_video=[inputs[i].video for i in call])
        else:
            kwargs.update(num_frames=first.num_frames)
            if first.task == IMAGE_TO_VIDEO:
                kwargs.update(image=[inputs[i].image for i in call])
        saving = (
            checkpoints.around(task_pipe, [items[i] for i in call], generators)
            if checkpoints
            else contextlib.nullcontext()
        )
        with saving:
            frames = task_pipe(**kwargs).frames
        videos.extend((frames[j] * 255).round().astype(np.uint8) for j in range(len(call)))  # as numpy_to_pil
    return videos


def _for_task(pipe: DiffusionPipeline, task: str) -> DiffusionPipeline:
    """The stock pipeline of `task` over the loaded components (no copies of the weights)."""
    wanted = PIPELINES[task]
    if type(pipe) is wanted:
        return pipe
    task_pipe = wanted(**pipe.components)
    task_pipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return task_pipe


def _calls(pipe: DiffusionPipeline, items: Sequence[WorkItem]) -> list[list[int]]:
    """How to split a unit into pipeline calls (indices into `items`)."""
    if items[0].task == VIDEO_TO_VIDEO and pipe.transformer.config.patch_size_t is not None:
        # CogVideoXVideoToVideoPipeline checks the temporal patch against len(video), which is
        # the batch size when several videos are passed: one video, as a list of frames, per call.
        return [[i] for i in range(len(items))]
    return [list(range(len(items)))]


class CogVideoXRunner:
    """The FamilyRunner of CogVideoX (see `cogdist.models.spec.FamilyRunner`)."""

    def load(self, spec: ModelSpec, dtype: torch.dtype) -> DiffusionPipeline:
        return load_pipeline(spec, dtype)

    def render(
        self,
        pipe: DiffusionPipeline,
        items: Sequence[WorkItem],
        device: torch.device,
        inputs: Sequence[Inputs],
        *,
        gang: GangGroup | None = None,
        checkpoints: StepCheckpointer | None = None,
    ) -> list[np.ndarray]:
        return render(pipe, items, device, inputs, gang=gang, checkpoints=checkpoints)

    def prepare_inputs(self, item: WorkItem, inputs: Inputs) -> Inputs:
        return inputs  # the stock pipelines resize what they get


RUNNER = CogVideoXRunner()
