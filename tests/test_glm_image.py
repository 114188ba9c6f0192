"""The GLM-Image family: an offline tiny pipeline (AR prior + diffusion decoder), stock-exact rendering."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline
from PIL import Image

from cogdist.inputs import InputError, Inputs
from cogdist.models.glm_image import runner as glm
from cogdist.models.registry import PRESETS, resolve_model
from cogdist.work import WorkItem

CPU = torch.device("cpu")


def picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def item(prompt: str, seed: int, *, size=(64, 64), steps=2, guidance=1.5, image: bool = False) -> WorkItem:
    task = "image-to-image" if image else "text-to-image"
    return WorkItem("x", prompt, None, seed, size[0], size[1], steps, guidance, None, "o.png", task=task)


def digest(pipe) -> str:
    h = hashlib.sha256()
    for name in ("text_encoder", "vision_language_encoder", "transformer", "vae"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stock(pipe, it: WorkItem, image: Image.Image | None = None) -> np.ndarray:
    """One stock `pipe(...)` call, as a user of diffusers writes it."""
    with torch.random.fork_rng(devices=[]):
        out = pipe(
            it.prompt,
            image=[image] if image is not None else None,
            height=it.height,
            width=it.width,
            num_inference_steps=it.num_inference_steps,
            guidance_scale=it.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(it.seed),
            output_type="np",
        ).images[0]
    return (out * 255).round().astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The AR stage samples ~260 tokens one by one: on a busy 2-core box, 2 threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> GlmImagePipeline:
    pipe = glm.load_pipeline(PRESETS["tiny-glm-image"], torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_weights_are_identical_in_every_process_and_the_ids_agree(pipe):
    code = "from cogdist.models.glm_image import runner as glm_image; from tests.test_glm_image import digest; print(digest(glm_image.build_tiny(0)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == digest(pipe) != digest(glm.build_tiny(1))
    ar = pipe.vision_language_encoder.config
    # The AR head covers the codebook only: every sampled id is a valid prior token, EOS is never sampled.
    assert (
        pipe.vision_language_encoder.lm_head.out_features == ar.text_config.vision_vocab_size == glm.CODEBOOK
    )
    assert (
        pipe.transformer.config.prior_vq_quantizer_codebook_size
        == ar.vq_config.num_embeddings
        == glm.CODEBOOK
    )
    assert pipe.processor.tokenizer.eos_token_id == ar.image_end_token_id == glm.IMAGE_END_ID
    assert pipe.tokenizer("").input_ids == [pipe.tokenizer.eos_token_id]  # an empty glyph is one token


def test_text_to_image_equals_the_stock_pipeline(pipe):
    for it in (
        item('a sign that says "hello"', 7),
        item("a cat", 8, size=(96, 32), guidance=1.0, steps=3),
        item("", 9, size=(32, 32)),  # the smallest size
    ):
        ours = glm.render(pipe, [it], CPU)[0]
        assert ours.shape == (it.height, it.width, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, stock(pipe, it))


def test_image_to_image_equals_the_stock_pipeline(pipe):
    cases = [
        (item("make it blue", 3, image=True), picture(96, 64, 0)),
        (item('add a sign "stop"', 4, size=(32, 96), image=True), picture(32, 32, 1)),
    ]
    for it, image in cases:
        ours = glm.render(pipe, [it], CPU, [Inputs(image=image)])[0]
        assert ours.shape == (it.height, it.width, 3)
        np.testing.assert_array_equal(ours, stock(pipe, it, image))
    other = glm.render(pipe, [cases[0][0]], CPU, [Inputs(image=picture(96, 64, 5))])[0]
    assert max_diff(other, glm.render(pipe, [cases[0][0]], CPU, [Inputs(image=cases[0][1])])[0]) > 0


def test_stock_image_to_image_needs_the_compatibility_fix(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    plain = GlmImagePipeline.from_pretrained(tmp_path)  # no fix: diffusers 0.42 x transformers 5
    plain.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="channels"):
        plain("edit", image=[picture(64, 64, 2)], height=64, width=64, num_inference_steps=1)


def test_the_decoder_given_prior_tokens_reproduces_the_full_result(pipe):
    rows = [item('a sign that says "hi"', 21), item("edit", 22, image=True)]
    images = [None, picture(64, 64, 3)]
    priors = [glm.generate_prior(pipe, it, image, CPU) for it, image in zip(rows, images)]
    t2i, i2i = priors
    assert t2i.prior_token_ids.shape == (1, 16) and t2i.prior_token_image_ids is None
    assert int(t2i.prior_token_ids.min()) >= 0 and int(t2i.prior_token_ids.max()) < glm.CODEBOOK
    assert i2i.source_image_grid_thw.tolist() == [[1, 4, 4]]
    # A pure function of the row: another rank computing it gets the same tokens.
    assert torch.equal(glm.generate_prior(pipe, rows[0], None, CPU).prior_token_ids, t2i.prior_token_ids)
    for it, image, prior in zip(rows, images, priors):
        decoded = glm.render(pipe, [it], CPU, [Inputs(image=image)], priors=[prior])[0]
        np.testing.assert_array_equal(decoded, stock(pipe, it, image))


def test_render_leaves_the_global_rng_alone(pipe):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    glm.render(pipe, [item("a fox", 5)], CPU)
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_mates_do_not_change_a_row(pipe):
    target = item('a sign that says "hello"', 11)
    mates = [item('a sign that says "world"', 12), item("a dog", 13), item('two signs, "a" and "bc"', 14)]
    rows = [mates[0], target, *mates[1:]]
    batched = glm.render(pipe, rows, CPU)
    for it, image in zip(rows, batched):
        # Stacked, CPU kernels may round ~1e-7 differently: a few pixels may move by 1/255.
        assert max_diff(image, glm.render(pipe, [it], CPU)[0]) <= 1
    np.testing.assert_array_equal(glm.render(pipe, [target], CPU)[0], stock(pipe, target))

    edits = [replace(item("edit", 15 + i, image=True), id=f"e{i}") for i in range(3)]
    inputs = [
        Inputs(image=picture(64, 64, 4)),
        Inputs(image=picture(64, 64, 5)),
        Inputs(image=picture(96, 64, 6)),
    ]
    together = glm.render(pipe, edits, CPU, inputs)
    for it, inp, image in zip(edits, inputs, together):
        assert max_diff(image, glm.render(pipe, [it], CPU, [inp])[0]) <= 1


def test_prompt_and_seed_both_change_the_image(pipe):
    base = glm.render(pipe, [item("a red fox", 1)], CPU)[0]
    assert max_diff(base, glm.render(pipe, [item("a red fox", 2)], CPU)[0]) > 10
    assert max_diff(base, glm.render(pipe, [item("a blue whale", 1)], CPU)[0]) > 10


def test_condition_images_are_fitted_or_refused_per_row():
    it = item("edit", 1, image=True)
    fitted = glm.prepare_inputs(it, Inputs(image=picture(100, 70, 0))).image
    assert fitted.size == (96, 64)  # centre-cropped to multiples of 32
    large = glm.prepare_inputs(it, Inputs(image=picture(4100, 2050, 0))).image
    assert large.size == (2048, 1024)
    for size in ((20, 64), (32, 160)):
        with pytest.raises(InputError, match="at least 32 pixels and an aspect ratio of at most 4"):
            glm.prepare_inputs(it, Inputs(image=picture(*size, 0)))


def test_saved_pipeline_resolves_and_loads_through_from_pretrained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    spec = resolve_model(str(tmp_path / "saved"))
    assert spec.family == "glm_image" and spec.tasks == ("text-to-image", "image-to-image")
    assert not spec.negative_prompt and spec.sizes.multiple == 32
    loaded = glm.load_pipeline(spec, torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert digest(loaded) == digest(pipe)
    rows = [(item('a paper crane "ok"', 5), None), (item("edit", 6, image=True), picture(96, 64, 6))]
    for it, image in rows:
        ours = glm.render(loaded, [it], CPU, [Inputs(image=image)])[0]
        np.testing.assert_array_equal(ours, glm.render(pipe, [it], CPU, [Inputs(image=image)])[0])
        np.testing.assert_array_equal(ours, stock(loaded, it, image))
