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

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    GlmImagePipeline,
    GlmImageTransformer2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    ByT5Tokenizer,
    GenerationConfig,
    GlmImageConfig,
    GlmImageForConditionalGeneration,
    GlmImageImageProcessorPil,
    GlmImageProcessor,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from cogdist.models.loading import from_pretrained
from cogdist.models.registry import ModelSpec
from cogdist.parallel.broadcast import on_first_rank
from cogdist.parallel.cfg import PAIRED, pairing
from cogdist.parallel.group import GangGroup
from cogdist.work import WorkItem
from cogdist.worker.inputs import InputError, Inputs

# One codebook size everywhere in the tiny model: VQ codes, the AR head (`vision_vocab_size`) and
# the decoder's prior embedding. With exactly CODEBOOK head outputs, random weights can only sample
# valid prior tokens: image start/end (= EOS) sit just above the codebook and are never sampled, so
# generate() always runs to max_new_tokens. (A wider head samples EOS early, or ids the decoder
# cannot look up, and the stock pipeline then fails with a shape or index error.)
CODEBOOK = 64
IMAGE_START_ID = CODEBOOK  # the processor's bos_token: opens every image
IMAGE_END_ID = CODEBOOK + 1  # closes condition images; the AR model's EOS
AR_SPECIAL_TOKENS = ("<|image|>", "<sop>", "<eop>", "<pad>")

# The processor's token grid is 1/32 of the pixels, upsampled 2x for the decoder (one token per
# vae_scale 8 x patch 2). Condition images must be multiples of 32 too, or the condition token grid
# and its latents disagree (a crash, or for tiny images a silent broadcast).
MULTIPLE = 32
CONDITION_MAX_SIDE = 2048
CONDITION_MAX_ASPECT = 4  # the image processor's smart_resize refuses more

_AR_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}{{ bos_token }}<|image|>{{ eos_token }}"
    "{%- elif item.type == 'text' -%}{{ item.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


@dataclass(frozen=True)
class PriorTokens:
    """The AR stage's output for one row, on the CPU (small: broadcastable between ranks)."""

    prior_token_ids: torch.Tensor
    """(1, 4 * token_h * token_w): the upsampled target-grid tokens."""
    prior_token_image_ids: torch.Tensor | None = None
    """Image-to-image: the upsampled tokens of the condition image."""
    source_image_grid_thw: torch.Tensor | None = None
    """Image-to-image: (1, 3), the upsampled grid of the condition image."""


# -- the tiny pipeline ------------------------------------------------------------------------


def ar_tokenizer() -> PreTrainedTokenizerFast:
    """The processor's tokenizer: byte-level text plus GLM-Image's special tokens, no download.

    Ids 0..CODEBOOK+1 are `<|dit_token_i|>` (image codes, image start, image end) as in the real
    tokenizer, then the 256 byte symbols, then <|image|>, <sop>, <eop>, <pad>.
    """
    dit_tokens = [f"<|dit_token_{i}|>" for i in range(IMAGE_END_ID + 1)]
    symbols = dit_tokens + sorted(pre_tokenizers.ByteLevel.alphabet()) + list(AR_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor: the processor always appends the grid spec and bos, so no input is empty.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=dit_tokens[IMAGE_START_ID],
        eos_token=dit_tokens[IMAGE_END_ID],
        pad_token="<pad>",
        image_token="<|image|>",  # GlmImageProcessor reads these three from its tokenizer
        grid_bos_token="<sop>",
        grid_eos_token="<eop>",
        padding_side="left",
    )
    # Special, so they match whole (already in the vocabulary: ids unchanged).
    fast.add_special_tokens({"additional_special_tokens": dit_tokens + list(AR_SPECIAL_TOKENS)})
    return fast


def build_tiny(seed: int = 0) -> GlmImagePipeline:
    """The GLM-Image architecture at toy size (~0.2 M parameters), identical in every process."""
    tokenizer = ar_tokenizer()
    vocab = tokenizer.get_vocab()
    # The glyph tokenizer is the real class: ByT5 needs no vocabulary file and appends </s>, so the
    # empty glyph text of a prompt without quotes still has one token.
    glyph_tokenizer = ByT5Tokenizer()
    processor = GlmImageProcessor(
        image_processor=GlmImageImageProcessorPil(
            # As in the released processor: 16-pixel patches, no temporal patch, no spatial merge.
            patch_size=16,
            temporal_patch_size=1,
            merge_size=1,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": MULTIPLE**2, "longest_edge": CONDITION_MAX_SIDE**2},
        ),
        tokenizer=tokenizer,
        chat_template=_AR_CHAT_TEMPLATE,
    )
    ar_config = GlmImageConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "vision_vocab_size": CODEBOOK,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "pad_token_id": vocab["<pad>"],
            "eos_token_id": IMAGE_END_ID,
            # mrope sections (t, h, w) sum to head_dim / 2 = 8.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "image_size": 64,
            "spatial_merge_size": 1,
        },
        vq_config={"embed_dim": 16, "num_embeddings": CODEBOOK, "latent_channels": 32},
        image_token_id=vocab["<|image|>"],
        image_start_token_id=IMAGE_START_ID,
        image_end_token_id=IMAGE_END_ID,
    )
    glyph_config = T5Config(
        vocab_size=len(glyph_tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=glyph_tokenizer.pad_token_id,
        eos_token_id=glyph_tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision_language_encoder = GlmImageForConditionalGeneration(ar_config)
        text_encoder = T5EncoderModel(glyph_config)
        transformer = GlmImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,  # divisible by 4: the 2D RoPE splits it over height and width
            num_attention_heads=6,  # divisible by 2 and 3: room for sequence-parallel degrees
            text_embed_dim=glyph_config.d_model,
            time_embed_dim=16,
            condition_dim=8,
            prior_vq_quantizer_codebook_size=CODEBOOK,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),  # four levels: the 8x scale of the real VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=64,
            # Not the identity, so the pipeline's latent (de)normalisation is exercised.
            latents_mean=[0.1, -0.1, 0.05, 0.0],
            latents_std=[1.0, 0.9, 1.1, 1.2],
        )
    vision_language_encoder.generation_config = GenerationConfig(
        bos_token_id=IMAGE_START_ID, eos_token_id=IMAGE_END_ID, pad_token_id=vocab["<pad>"]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    for model in (vision_language_encoder, text_encoder, transformer, vae):
        model.eval()
    pipe = GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=text_encoder,
        vision_language_encoder=vision_language_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    ensure_i2i_compat(pipe)
    return pipe


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


def ensure_i2i_compat(pipe: GlmImagePipeline) -> None:
    """Make the stock image-to-image AR path work with transformers 5.x (idempotent, this instance).

    diffusers 0.42 (`generate_prior_tokens`) concatenates `get_image_features(...).pooler_output`
    and passes the tensor to `get_image_tokens`; transformers 5 returns, and iterates over, a list
    of per-image maps, so after the cat it walks channels and the VQ conv fails ("expected input
    ... to have 32 channels"). This splits the tensor back into the list; the model's own forward,
    which passes the list, is unaffected.
    """
    model = pipe.vision_language_encoder
    if getattr(model, "_cogdist_i2i_compat", False):
        return
    hidden = model.config.vision_config.hidden_size  # channels of one image's map
    stock = model.get_image_tokens

    def get_image_tokens(self: Any, hidden_states: Any, image_grid_thw: torch.Tensor | None = None) -> Any:
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3:
            hidden_states = list(hidden_states.split(hidden, dim=0))
        return stock(hidden_states, image_grid_thw)

    model.get_image_tokens = types.MethodType(get_image_tokens, model)
    model._cogdist_i2i_compat = True


# -- inputs ------------------------------------------------------------------------------------


def prepare_inputs(item: WorkItem, inputs: Inputs) -> Inputs:
    """Fit a condition image to what the AR tokenizer and the decoder agree on, or refuse the row.

    An image larger than CONDITION_MAX_SIDE is scaled down, then centre-cropped to multiples of 32
    (at most 31 pixels per side), which the stock pipeline would otherwise mis-shape.
    """
    image = inputs.image
    if image is None:
        return inputs
    width, height = image.size
    if max(width, height) > CONDITION_MAX_SIDE:
        scale = CONDITION_MAX_SIDE / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    if min(width, height) < MULTIPLE or max(width, height) > CONDITION_MAX_ASPECT * min(width, height):
        raise InputError(
            f"condition image of {item.id!r} is {width}x{height}: GLM-Image needs sides of at least "
            f"{MULTIPLE} pixels and an aspect ratio of at most {CONDITION_MAX_ASPECT}"
        )
    crop_w, crop_h = width - width % MULTIPLE, height - height % MULTIPLE
    if (crop_w, crop_h) != image.size:
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return Inputs(image=image)


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


CFG_PARALLEL = PAIRED
"""The pipeline calls the transformer twice per step, conditional first."""

# The AR model: the pipeline embeds the empty negative glyphs itself on every rank.
FIRST_RANK_MODELS = ("vision_language_encoder",)
"""Models that run only in rank 0's stages of a gang (see `render`)."""


@torch.no_grad()
def render(
    pipe: GlmImagePipeline,
    items: Sequence[WorkItem],
    device: torch.device,
    inputs: Sequence[Inputs] | None = None,
    priors: Sequence[PriorTokens] | None = None,
    gang: GangGroup | None = None,
) -> list[np.ndarray]:
    """Images (uint8, height x width x 3) for `items`, in their order.

    `inputs` hold the condition images (already through `prepare_inputs`); `priors` (one per item,
    from `generate_prior`, e.g. computed elsewhere) skip the AR stage. In a gang, the AR stage and
    the glyph encoding run on its first rank only.
    """
    conditions = [inp.image for inp in inputs] if inputs else [None] * len(items)
    cfg = items[0].guidance_scale > 1

    def first_stages() -> list[tuple]:
        prepared = []
        for index, (item, condition) in enumerate(zip(items, conditions)):
            prior = priors[index] if priors is not None else generate_prior(pipe, item, condition, device)
            # This row's glyphs alone: no left padding from other rows.
            embeds, _ = pipe.encode_prompt(item.prompt, False, device=device, dtype=pipe.dtype)
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
