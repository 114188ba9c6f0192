"""GLM-Image text-to-image and image-to-image: the tiny random-weight pipeline, loading, rendering.

GLM-Image runs in two stages:
- the autoregressive (AR) stage, `GlmImageForConditionalGeneration.generate(do_sample=True)`,
  samples d32 "prior" image tokens: for text-to-image a ~16x16 preview grid then the target grid,
  for image-to-image the target grid only (the condition image is tokenised, not sampled);
- the diffusion decoder (`GlmImageTransformer2DModel` + VAE) denoises latents conditioned on the
  2x-upsampled prior tokens, the glyph embeddings (T5 over the prompt's quoted text) and, for
  image-to-image, a KV cache written from the condition image.

Rendering keeps the stock `GlmImagePipeline` in charge of both stages and feeds it what makes each
row independent of its batch:
- the AR stage runs one row at a time (`generate_prior`), seeded as the stock `__call__` seeds it
  (`torch.manual_seed(generator.initial_seed())`) but inside `fork_rng`, so the caller's global RNG
  is left alone; its tokens are small and can be computed on one rank and broadcast;
- glyph embeddings are encoded one row at a time: the stock pipeline zero-pads a batch on the left
  without an attention mask, which changes the shorter rows' images; rows whose glyph lengths match
  are then stacked;
- initial latents are drawn per row from `torch.Generator("cpu").manual_seed(seed)`, the stock
  pipeline's only draw from that generator;
- image-to-image rows are stacked only when their condition images give KV caches of one length.
So a row's output equals `pipe(prompt, image=[img] or None, ..., generator=Generator("cpu").manual_seed(seed))`.
GLM-Image has no negative prompt (its unconditional branch drops the prior tokens and uses an
empty glyph text); manifests with one are refused at validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import GlmImagePipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from cogdist.inputs import Inputs
from cogdist.models.glm_image.compat import ensure_i2i_compat
from cogdist.models.glm_image.inputs import prepare_inputs
from cogdist.models.glm_image.prior import PriorTokens, generate_priors
from cogdist.models.glm_image.tiny import CODEBOOK, IMAGE_END_ID, IMAGE_START_ID, build_tiny
from cogdist.models.loading import from_pretrained
from cogdist.models.prompts import prompt_cache
from cogdist.models.spec import ModelSpec, StepCheckpointer
from cogdist.parallel.broadcast import on_first_rank
from cogdist.parallel.cfg import pairing
from cogdist.parallel.group import GangGroup
from cogdist.work import WorkItem

__all__ = [
    "CODEBOOK",
    "IMAGE_END_ID",
    "IMAGE_START_ID",
    "RUNNER",
    "PriorTokens",
    "build_tiny",
    "generate_prior",
    "load_pipeline",
    "prepare_inputs",
    "render",
]


def load_pipeline(spec: ModelSpec, dtype: torch.dtype) -> GlmImagePipeline:
    """The pipeline on the CPU; the worker places it (device, offload, VAE tiling)."""
    if spec.tiny:
        pipe = build_tiny(spec.seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return pipe
    pipe = from_pretrained(GlmImagePipeline, spec, dtype)
    ensure_i2i_compat(pipe)
    return pipe


# -- rendering ---------------------------------------------------------------------------------


@contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Restore the global RNG state(s) the AR stage reseeds."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


@torch.no_grad()
def generate_prior(
    pipe: GlmImagePipeline, item: WorkItem, image: Image.Image | None, device: torch.device
) -> PriorTokens:
    """The AR stage for one row, exactly as `pipe(...)` runs it, without touching the global RNG."""
    generator = torch.Generator("cpu").manual_seed(item.seed)
    with _own_rng(device):
        prior_ids, image_ids, grids = pipe.generate_prior_tokens(
            prompt=item.prompt,
            height=item.height,
            width=item.width,
            image=[[image]] if image is not None else None,
            device=device,
            generator=generator,
        )
    if image_ids is None:
        return PriorTokens(prior_token_ids=prior_ids.cpu())
    return PriorTokens(prior_ids.cpu(), image_ids[0].cpu(), grids[0].cpu())


@torch.no_grad()
def render(
    pipe: GlmImagePipeline,
    items: Sequence[WorkItem],
    device: torch.device,
    inputs: Sequence[Inputs] | None = None,
    priors: Sequence[PriorTokens] | None = None,
    gang: GangGroup | None = None,
    prior_batch: int = 1,
) -> list[np.ndarray]:
    """Images (uint8, height x width x 3) for `items`, in their order.

    `inputs` hold the condition images (already through `prepare_inputs`); `priors` (one per item,
    from `generate_prior`, e.g. computed elsewhere) skip the AR stage. `prior_batch` > 1 runs the
    AR stage that many rows at a time (cogdist.models.glm_image.prior). In a gang, the AR stage
    and the glyph encoding run on its first rank only.
    """
    conditions = [inp.image for inp in inputs] if inputs else [None] * len(items)
    cfg = items[0].guidance_scale > 1

    prompts = prompt_cache(pipe)

    def first_stages() -> list[tuple]:
        prepared = []
        given = priors
        if given is None and prior_batch > 1:
            given = generate_priors(pipe, items, conditions, device, prior_batch)
        for index, (item, condition) in enumerate(zip(items, conditions)):
            prior = given[index] if given is not None else generate_prior(pipe, item, condition, device)
            # This row's glyphs alone: no left padding from other rows.
            embeds, _ = prompts.get(
                item.prompt,
                lambda item=item: pipe.encode_prompt(item.prompt, False, device=device, dtype=pipe.dtype),
            )
            shape = (
                1,
                pipe.transformer.config.in_channels,
                item.height // pipe.vae_scale_factor,
                item.width // pipe.vae_scale_factor,
            )
            # The AR stage never draws from this generator: this is the stock pipeline's first draw.
            latents = randn_tensor(
                shape,
                generator=torch.Generator("cpu").manual_seed(item.seed),
                device=device,
                dtype=embeds.dtype,
            )
            prepared.append((embeds, latents, prior))
        return prepared

    prepared = on_first_rank(gang, first_stages)
    groups: dict[tuple, list[int]] = {}
    for index, ((embeds, _, prior), condition) in enumerate(zip(prepared, conditions)):
        key: tuple = (embeds.shape[1], condition is not None)
        if condition is not None:  # per-sample KV caches are concatenated: equal lengths only
            key += (condition.size, prior.prior_token_image_ids.numel())
        groups.setdefault(key, []).append(index)

    first = items[0]
    images: list[np.ndarray | None] = [None] * len(items)
    for indices in groups.values():
        image_to_image = conditions[indices[0]] is not None
        # The unconditional pass as the pipeline makes it: empty glyphs, prior tokens dropped,
        # no condition-image KV cache ("skip").
        negative = (
            pipe.encode_prompt([""] * len(indices), False, device=device, dtype=pipe.dtype)[0]
            if cfg
            else None
        )

        def uncond(kwargs: dict, negative=negative) -> dict:
            drop = torch.ones_like(kwargs["prior_token_drop"])
            return {**kwargs, "encoder_hidden_states": negative, "prior_token_drop": drop, "kv_caches": None}

        with pairing(pipe.transformer, uncond, passthrough=_writes_kv_cache):
            output = pipe(
                prompt_embeds=torch.cat([prepared[i][0] for i in indices]),
                latents=torch.cat([prepared[i][1] for i in indices]),
                prior_token_ids=torch.cat([prepared[i][2].prior_token_ids for i in indices]).to(device),
                prior_token_image_ids=[prepared[i][2].prior_token_image_ids.to(device) for i in indices]
                if image_to_image
                else None,
                source_image_grid_thw=[prepared[i][2].source_image_grid_thw.to(device) for i in indices]
                if image_to_image
                else None,
                image=[[conditions[i]] for i in indices] if image_to_image else None,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                output_type="np",
            ).images
        for i, image in zip(indices, output):
            images[i] = (image * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    return images  # type: ignore[return-value]


def _writes_kv_cache(kwargs: dict) -> bool:
    """The image-to-image prefill call, which stores the condition image's keys and values."""
    caches = kwargs.get("kv_caches")
    return caches is not None and caches[0].mode == "write"


class GlmImageRunner:
    """The FamilyRunner of GLM-Image (see `cogdist.models.spec.FamilyRunner`)."""

    def load(self, spec: ModelSpec, dtype: torch.dtype) -> GlmImagePipeline:
        return load_pipeline(spec, dtype)

    def render(
        self,
        pipe: GlmImagePipeline,
        items: Sequence[WorkItem],
        device: torch.device,
        inputs: Sequence[Inputs],
        *,
        gang: GangGroup | None = None,
        checkpoints: StepCheckpointer | None = None,
        prior_batch: int = 1,
    ) -> list[np.ndarray]:
        """`render` with the AR stage run here; GLM-Image takes no step checkpoints."""
        return render(pipe, items, device, inputs, gang=gang, prior_batch=prior_batch)

    def prepare_inputs(self, item: WorkItem, inputs: Inputs) -> Inputs:
        return prepare_inputs(item, inputs)


RUNNER = GlmImageRunner()
