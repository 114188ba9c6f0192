"""CogView4 text-to-image, its torch side: the tiny random-weight pipeline, loading, batched rendering.

Rendering keeps the stock `CogView4Pipeline` in charge of the denoising loop and feeds it what
makes each row independent of its batch:
- prompts are encoded one row at a time, because the pipeline left-pads a batch to its longest
  prompt without an attention mask, which changes every shorter row's image; rows whose encoded
  lengths match are then stacked into one call;
- initial latents are drawn per row on the CPU from `torch.Generator("cpu").manual_seed(seed)`,
  exactly as the stock pipeline draws them when given that generator, then moved to the device.
So a row's output equals `CogView4Pipeline(...)(prompt, ..., generator=Generator("cpu").manual_seed(seed))`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import GlmConfig, GlmModel

from cogdist.inputs import Inputs
from cogdist.models.loading import from_pretrained
from cogdist.models.prompts import prompt_cache
from cogdist.models.spec import ModelSpec, StepCheckpointer
from cogdist.models.tiny import tiny_tokenizer
from cogdist.parallel.broadcast import on_first_rank
from cogdist.parallel.cfg import pairing
from cogdist.parallel.group import GangGroup
from cogdist.work import WorkItem


def build_tiny(seed: int = 0) -> CogView4Pipeline:
    """The CogView4 architecture at toy size with random weights, identical in every process."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = GlmModel(
            GlmConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                pad_token_id=0,
                max_position_embeddings=2048,
                # Large embeddings so that the prompt visibly changes the image.
                initializer_range=1.0,
            )
        )
        transformer = CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=6,  # divisible by 2 and 3: room for sequence-parallel degrees
            text_embed_dim=32,
            time_embed_dim=16,
            condition_dim=8,
            sample_size=8,  # default 8 latents * 8 = 64 pixels
            rope_axes_dim=(8, 8),
            pos_embed_max_size=64,
        )
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 16, 16),  # four levels: the 8x scale of the real VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    text_encoder.eval()
    transformer.eval()
    vae.eval()
    return CogView4Pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_pipeline(spec: ModelSpec, dtype: torch.dtype) -> CogView4Pipeline:
    """The pipeline on the CPU; the worker places it (device, offload, VAE tiling)."""
    if spec.tiny:
        pipe = build_tiny(spec.seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return pipe
    return from_pretrained(CogView4Pipeline, spec, dtype)


@torch.no_grad()
def render(
    pipe: CogView4Pipeline,
    items: Sequence[WorkItem],
    device: torch.device,
    inputs: Sequence | None = None,
    gang: GangGroup | None = None,
) -> list[np.ndarray]:
    """Images (uint8, height x width x 3) for `items`, which share one shape, in their order.

    CogView4 is text-to-image only: `inputs` (decoded conditioning inputs) are never used. In a
    gang, prompts are encoded on its first rank only.
    """
    first = items[0]
    guidance = first.guidance_scale
    cfg = guidance > 1

    prompts = prompt_cache(pipe)

    def encode() -> list[tuple]:
        encoded = []
        for item in items:
            positive, negative = prompts.get(
                (item.prompt, item.negative_prompt, cfg),
                lambda item=item: pipe.encode_prompt(item.prompt, item.negative_prompt, cfg, device=device),
            )
            generator = torch.Generator("cpu").manual_seed(item.seed)
            latents = pipe.prepare_latents(
                1,
                pipe.transformer.config.in_channels,
                item.height,
                item.width,
                torch.float32,
                device,
                generator,
            )
            encoded.append((positive, negative, latents))
        return encoded

    encoded = on_first_rank(gang, encode)

    # Stack rows whose encoded prompts have equal lengths; padding would change their images.
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (positive, negative, _) in enumerate(encoded):
        key = (positive.shape[1], negative.shape[1] if negative is not None else 0)
        groups.setdefault(key, []).append(index)

    images: list[np.ndarray | None] = [None] * len(items)
    for indices in groups.values():
        negative = torch.cat([encoded[i][1] for i in indices]) if cfg else None
        with pairing(
            pipe.transformer, lambda kwargs, negative=negative: {**kwargs, "encoder_hidden_states": negative}
        ):
            output = pipe(
                prompt_embeds=torch.cat([encoded[i][0] for i in indices]),
                negative_prompt_embeds=negative,
                latents=torch.cat([encoded[i][2] for i in indices]),
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=guidance,
                output_type="np",
            ).images
        for i, image in zip(indices, output):
            images[i] = (image * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    return images  # type: ignore[return-value]


class CogView4Runner:
    """The FamilyRunner of CogView4 (see `cogdist.models.spec.FamilyRunner`)."""

    def load(self, spec: ModelSpec, dtype: torch.dtype) -> CogView4Pipeline:
        return load_pipeline(spec, dtype)

    def render(
        self,
        pipe: CogView4Pipeline,
        items: Sequence[WorkItem],
        device: torch.device,
        inputs: Sequence[Inputs],
        *,
        gang: GangGroup | None = None,
        checkpoints: StepCheckpointer | None = None,
    ) -> list[np.ndarray]:
        """`render`; CogView4 takes no step checkpoints (a few dozen steps of one image)."""
        return render(pipe, items, device, inputs, gang=gang)

    def prepare_inputs(self, item: WorkItem, inputs: Inputs) -> Inputs:
        return inputs  # text-to-image: nothing to fit


RUNNER = CogView4Runner()
