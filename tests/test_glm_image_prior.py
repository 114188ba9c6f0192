"""--prior-batch: GLM-Image's AR prior for several rows at once, each row drawing from its own generator."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import GenerationConfig

from cogdist.errors import UsageError
from cogdist.inputs import Inputs
from cogdist.models.glm_image import runner as glm
from cogdist.models.glm_image.prior import generate_prior_batch, generate_priors
from cogdist.models.registry import PRESETS
from cogdist.options import RenderOptions
from tests.test_glm_image import CPU, item, max_diff, one_thread, picture  # noqa: F401 (fixture)

WARPED = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
"""Sampling settings as a real checkpoint's generation_config sets them (the tiny one sets none:
transformers' defaults apply, top-k 50 of its 64 codebook tokens)."""


@pytest.fixture(scope="module", params=["defaults", "warped"])
def pipe(request):
    pipe = glm.load_pipeline(PRESETS["tiny-glm-image"], torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if request.param == "warped":
        config = pipe.vision_language_encoder.generation_config
        pipe.vision_language_encoder.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            **WARPED,
        )
    return pipe


def edits(count: int) -> tuple[list, list]:
    """Image-to-image rows with other prompts and condition images of two sizes, fitted as a worker fits them."""
    prompts = ["edit", "make it a rainy night in the city", "blue", 'add a sign that says "exit"']
    rows = [replace(item(prompts[i % 4], 30 + i, image=True), id=f"e{i}") for i in range(count)]
    images = [picture(64 if i % 2 else 96, 64, 40 + i) for i in range(count)]
    return rows, [glm.prepare_inputs(row, Inputs(image=image)).image for row, image in zip(rows, images)]


TEXT = [
    item('a sign that says "hello"', 11),
    item("a cat", 12),
    item("two dogs on a long road at night, in the rain, under street lights", 13),
    item("", 14),
]


def test_a_batch_of_one_draws_the_stock_pipelines_tokens(pipe):
    rows, images = edits(2)
    for row, image in [*zip(TEXT, [None] * 4), *zip(rows, images)]:
        stock = glm.generate_prior(pipe, row, image, CPU)  # the stock generate_prior_tokens
        ours = generate_prior_batch(pipe, [row], [image], CPU)[0]
        assert torch.equal(ours.prior_token_ids, stock.prior_token_ids)
        if image is not None:
            assert torch.equal(ours.prior_token_image_ids, stock.prior_token_image_ids)
            assert torch.equal(ours.source_image_grid_thw, stock.source_image_grid_thw)


def test_a_row_alone_draws_what_it_draws_in_a_batch_of_four(pipe):
    rows, images = edits(4)
    for batch, conditions in ((TEXT, [None] * 4), (rows, images)):
        together = generate_priors(pipe, batch, conditions, CPU, 4)
        for row, condition, prior in zip(batch, conditions, together):
            alone = glm.generate_prior(pipe, row, condition, CPU)
            assert torch.equal(prior.prior_token_ids, alone.prior_token_ids), row.prompt
    # The seed, not the batch position, decides: two rows of one prompt and seed draw alike.
    twins = generate_priors(pipe, [TEXT[1], TEXT[0], TEXT[1]], [None] * 3, CPU, 4)
    assert torch.equal(twins[0].prior_token_ids, twins[2].prior_token_ids)
    assert not torch.equal(twins[0].prior_token_ids, twins[1].prior_token_ids)


def test_rendered_with_the_batched_prior_a_row_is_its_image_alone(pipe):
    rows, images = edits(4)
    inputs = [Inputs(image=image) for image in images]
    together = glm.render(pipe, rows, CPU, inputs, prior_batch=4)
    for row, row_inputs, image in zip(rows, inputs, together):
        assert max_diff(image, glm.render(pipe, [row], CPU, [row_inputs])[0]) <= 1
    torch.manual_seed(99)
    state = torch.get_rng_state()
    text = glm.render(pipe, TEXT[:2], CPU, prior_batch=2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for row, image in zip(TEXT[:2], text):
        assert max_diff(image, glm.render(pipe, [row], CPU)[0]) <= 1


def test_sampling_settings_it_cannot_apply_are_refused(pipe):
    model = pipe.vision_language_encoder
    kept = model.generation_config
    model.generation_config = GenerationConfig(**{**kept.to_dict(), "do_sample": True, "typical_p": 0.9})
    try:
        with pytest.raises(ValueError, match="sets typical_p"):
            generate_prior_batch(pipe, TEXT[:2], [None, None], CPU)
    finally:
        model.generation_config = kept


def test_the_option_is_refused_where_it_cannot_batch():
    options = RenderOptions(manifest="m.parquet", model="x", out="o", batch_size=4, prior_batch=4)
    options.check(PRESETS["tiny-glm-image"])
    with pytest.raises(UsageError, match="tiny-cogview4 has no autoregressive prior"):
        options.check(PRESETS["tiny-cogview4"])
    with pytest.raises(UsageError, match="set --batch-size to at least 4"):
        replace(options, batch_size=2).check(PRESETS["tiny-glm-image"])
    with pytest.raises(UsageError, match="--prior-batch must be at least 1"):
        replace(options, prior_batch=0).check(PRESETS["tiny-glm-image"])
