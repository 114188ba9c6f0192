"""GLM-Image's autoregressive prior for several rows at once (`--prior-batch N`).

At batch 1 the AR stage decodes token by token with the GPU's compute nearly idle; several rows
decoding together share each step. The stock batched prior (`generate_prior_tokens` with a list
of prompts) seeds the global RNG once for the whole batch, so a row's tokens would depend on its
batch-mates. Here transformers' `generate` still runs the batch (left padding, attention mask, KV
cache, the model's per-row 3D positions), but every token is drawn by `RowSampler`: the stock
warpers (temperature, top-k, top-p) applied as `generate(do_sample=True)` applies them, then one
`torch.multinomial` per row from that row's own generator, seeded as the stock pipeline seeds the
global RNG (`torch.manual_seed(seed)`). `generate` then runs greedy over one finite score per row.

So a batch of one draws exactly what `pipe(prompt, generator=Generator("cpu").manual_seed(seed))`
draws, and a row in a batch draws from its own generator only; its logits may round differently
next to other rows (other shapes, padding), which can flip a token where two cumulative
probabilities meet its uniform draw. tests/test_glm_image_prior.py and benchmarks/prior_batch.py
measure it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import GlmImagePipeline
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cogdist.work import WorkItem


@dataclass(frozen=True)
class PriorTokens:
    """The AR stage's output for one row, on the CPU (small: broadcastable between ranks)."""

    prior_token_ids: torch.Tensor
    """(1, 4 * token_h * token_w): the upsampled target-grid tokens."""
    prior_token_image_ids: torch.Tensor | None = None
    """Image-to-image: the upsampled tokens of the condition image."""
    source_image_grid_thw: torch.Tensor | None = None
    """Image-to-image: (1, 3), the upsampled grid of the condition image."""


def sampling_config(model) -> GenerationConfig:
    """The generation config `model.generate()` would sample with: the model's, then transformers'
    global defaults for what it leaves unset (as `GenerationMixin._prepare_generation_config`)."""
    config = copy.deepcopy(model.generation_config)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return config


def warpers(config: GenerationConfig) -> list[LogitsProcessor]:
    """The warpers `generate(do_sample=True)` appends, in its order (transformers'
    `_get_logits_processor`), for the settings GLM-Image's prior uses."""
    # The settings RowSampler does not apply, each where transformers would turn it on.
    active = {
        "top_h": config.top_h is not None,
        "typical_p": config.typical_p is not None and config.typical_p < 1.0,
        "epsilon_cutoff": config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0,
        "eta_cutoff": config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0,
    }
    unsupported = [name for name, on in active.items() if on]
    if unsupported:
        raise ValueError(
            f"--prior-batch: the AR model's generation config sets {', '.join(unsupported)}, which the "
            "batched prior does not apply; render without --prior-batch"
        )
    applied: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        applied.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        applied.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        applied.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        applied.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return applied


class RowSampler(LogitsProcessor):
    """Samples each row's next token from its own generator; returns scores whose only finite
    entry per row is that token, so greedy decoding takes it."""

    def __init__(self, warpers: Sequence[LogitsProcessor], generators: Sequence[torch.Generator]):
        self.warpers = list(warpers)
        self.generators = list(generators)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            # One row at a time through the warpers and softmax: the exact ops of a batch of one.
            row_ids, row_scores = input_ids[row : row + 1], scores[row : row + 1]
            for warper in self.warpers:
                row_scores = warper(row_ids, row_scores)
            probs = torch.nn.functional.softmax(row_scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=generator)
            chosen[row, token[0, 0]] = 0.0
        return chosen


def _greedy(config: GenerationConfig, max_new_tokens: int) -> GenerationConfig:
    """`config` decoding `max_new_tokens` greedily, its sampling settings back at their defaults
    (no warnings)."""
    greedy = copy.deepcopy(config)
    greedy.do_sample = False
    greedy.temperature, greedy.top_k, greedy.top_p, greedy.min_p = 1.0, 50, 1.0, None
    greedy.max_length, greedy.max_new_tokens = None, max_new_tokens
    return greedy


def generate_priors(
    pipe: GlmImagePipeline,
    items: Sequence[WorkItem],
    images: Sequence[Image.Image | None],
    device: torch.device,
    batch: int,
) -> list[PriorTokens]:
    """The AR stage of `items`, in their order, up to `batch` rows at a time among rows of one size
    and task."""
    groups: dict[tuple, list[int]] = {}
    for index, (item, image) in enumerate(zip(items, images)):
        groups.setdefault((item.height, item.width, image is None), []).append(index)
    priors: list[PriorTokens | None] = [None] * len(items)
    for indices in groups.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            made = generate_prior_batch(pipe, [items[i] for i in chunk], [images[i] for i in chunk], device)
            for index, prior in zip(chunk, made):
                priors[index] = prior
    return priors  # type: ignore[return-value]


@torch.no_grad()
def generate_prior_batch(
    pipe: GlmImagePipeline,
    items: Sequence[WorkItem],
    images: Sequence[Image.Image | None],
    device: torch.device,
) -> list[PriorTokens]:
    """Each row's prior tokens, for rows of one size and task (all text-to-image, or all
    image-to-image with one condition image each)."""
    first = items[0]
    image_to_image = images[0] is not None
    messages = []
    for item, image in zip(items, images):
        content = [{"type": "image", "image": image}] if image_to_image else []
        content.append({"type": "text", "text": item.prompt})
        messages.append([{"role": "user", "content": content}])
    inputs = pipe.processor.apply_chat_template(
        messages,
        tokenize=True,
        padding=len(items) > 1,  # the processor's tokenizer pads on the left
        target_h=first.height,
        target_w=first.width,
        return_dict=True,
        return_tensors="pt",
    ).to(device)
    grids = inputs["image_grid_thw"]
    per_row = len(grids) // len(items)  # condition image (image-to-image), then the target grid(s)
    max_new_tokens, offset, token_h, token_w = pipe._compute_generation_params(
        image_grid_thw=grids[:per_row], is_text_to_image=not image_to_image
    )
    model = pipe.vision_language_encoder
    condition = [(None, None)] * len(items)
    if image_to_image:
        condition = _condition_tokens(pipe, inputs["pixel_values"], grids[::per_row])

    config = sampling_config(model)
    sampler = RowSampler(
        warpers(config), [torch.Generator(device=device).manual_seed(item.seed) for item in items]
    )
    outputs = model.generate(
        **inputs,
        generation_config=_greedy(config, max_new_tokens),
        logits_processor=LogitsProcessorList([sampler]),
    )
    prompt_length = inputs["input_ids"].shape[-1]  # left padding: every row's new tokens start here
    priors = []
    for row, (image_ids, image_grid) in enumerate(condition):
        tokens = pipe._extract_large_image_tokens(
            outputs[row : row + 1], prompt_length, offset, token_h * token_w
        )
        priors.append(
            PriorTokens(pipe._upsample_token_ids(tokens, token_h, token_w).cpu(), image_ids, image_grid)
        )
    return priors


def _condition_tokens(
    pipe: GlmImagePipeline, pixel_values: torch.Tensor, source_grids: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each condition image's upsampled prior tokens and grid, as `generate_prior_tokens` makes them."""
    model = pipe.vision_language_encoder
    features = model.get_image_features(pixel_values, source_grids).pooler_output  # one map per image
    tokens = model.get_image_tokens(list(features), source_grids)
    result = []
    for ids, grid in zip(torch.split(tokens, source_grids.prod(dim=-1).tolist()), source_grids):
        _, h, w = grid.tolist()
        upsampled = pipe._upsample_token_ids(ids, int(h), int(w)).squeeze(0)
        grid = grid.clone()
        grid[1:] *= 2
        result.append((upsampled.cpu(), grid[None].cpu()))
    return result
