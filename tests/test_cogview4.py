"""The CogView4 family code: tiny weights, stock-pipeline equivalence, batch independence, loading."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from cogdist.errors import ModelError
from cogdist.models.cogview4 import runner as cogview4
from cogdist.models.registry import PRESETS, resolve_model
from cogdist.work import WorkItem

CPU = torch.device("cpu")


def weights_digest(pipe) -> str:
    digest = hashlib.sha256()
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def pipe():
    return cogview4.load_pipeline(PRESETS["tiny-cogview4"], torch.float32)


def item(
    item_id: str, prompt: str, seed: int, *, negative=None, size=(64, 64), steps=4, guidance=5.0
) -> WorkItem:
    return WorkItem(
        item_id, prompt, negative, seed, size[0], size[1], steps, guidance, None, f"outputs/{item_id}.png"
    )


def stock(pipe, it: WorkItem) -> np.ndarray:
    image = pipe(
        it.prompt,
        negative_prompt=it.negative_prompt,
        height=it.height,
        width=it.width,
        num_inference_steps=it.num_inference_steps,
        guidance_scale=it.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(it.seed),
    ).images[0]
    return np.asarray(image)


def test_tiny_weights_are_identical_in_every_process(pipe):
    code = (
        "import torch; from cogdist.models.cogview4 import runner as cogview4; from cogdist.models.registry import PRESETS;"
        "from tests.test_cogview4 import weights_digest;"
        "print(weights_digest(cogview4.load_pipeline(PRESETS['tiny-cogview4'], torch.float32)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == weights_digest(pipe)
    assert weights_digest(cogview4.build_tiny(seed=1)) != other


def test_render_equals_the_stock_pipeline_with_a_cpu_generator(pipe):
    rows = [
        item("a", "a red fox in the snow", 7),
        item("b", "a lighthouse", 8, negative="blurry", size=(96, 64)),
        item("c", "no guidance", 9, guidance=1.0),
    ]
    for row in rows:
        ours = cogview4.render(pipe, [row], CPU)[0]
        assert ours.shape == (row.height, row.width, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, stock(pipe, row))


def test_batch_mates_do_not_change_a_row(pipe):
    target = item("t", "a red fox", 11)
    mates = [
        item("m1", "a much longer prompt about a lighthouse on a cliff at dusk, painted in oils", 12),
        item("m2", "owl", 13, negative="blurry, low quality, jpeg artifacts"),
        item("m3", "a red cat", 14),  # same encoded length as the target: stacked with it
    ]
    alone = cogview4.render(pipe, [target], CPU)[0]
    batched = cogview4.render(pipe, [mates[0], target, mates[1], mates[2]], CPU)
    assert np.abs(batched[1].astype(int) - alone.astype(int)).max() <= 1
    for mate, image in zip(mates, [batched[0], batched[2], batched[3]]):
        assert np.abs(image.astype(int) - cogview4.render(pipe, [mate], CPU)[0].astype(int)).max() <= 1


def test_stock_batching_would_have_changed_the_row(pipe):
    """Why rows are encoded one by one: the stock pipeline pads a batch to its longest prompt."""
    target = item("t", "a red fox", 11)
    long = item("l", "a much longer prompt about a lighthouse on a cliff at dusk, painted in oils", 12)
    batched = pipe(
        [long.prompt, target.prompt],
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (12, 11)],
    ).images[1]
    assert np.abs(np.asarray(batched).astype(int) - stock(pipe, target).astype(int)).max() > 10


def test_prompt_and_seed_both_change_the_image(pipe):
    base = cogview4.render(pipe, [item("a", "a red fox", 1)], CPU)[0].astype(int)
    other_seed = cogview4.render(pipe, [item("a", "a red fox", 2)], CPU)[0].astype(int)
    other_prompt = cogview4.render(pipe, [item("a", "a blue whale", 1)], CPU)[0].astype(int)
    assert np.abs(base - other_seed).mean() > 10
    assert np.abs(base - other_prompt).max() > 10


def test_saved_pipeline_loads_through_from_pretrained_and_renders_the_same(pipe, tiny_model_dir):
    spec = resolve_model(str(tiny_model_dir))
    assert spec.family == "cogview4" and not spec.tiny and spec.source == str(tiny_model_dir)
    assert (spec.width, spec.height) == (64, 64)
    assert spec.sizes.multiple == 16
    loaded = cogview4.load_pipeline(spec, torch.float32)
    assert weights_digest(loaded) == weights_digest(pipe)
    row = item("x", "a paper crane", 5)
    np.testing.assert_array_equal(
        cogview4.render(loaded, [row], CPU)[0], cogview4.render(pipe, [row], CPU)[0]
    )


def test_loading_refuses_pickle_checkpoints(tmp_path, pipe):
    folder = tmp_path / "pickled"
    pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "transformer" / "diffusion_pytorch_model.bin").exists()
    refusal = (
        r"only pickle weights for transformer, vae \(transformer/diffusion_pytorch_model.bin"
        r".*--allow-pickle-weights"
    )
    with pytest.raises(ModelError, match=refusal):
        resolve_model(str(folder))
    # The worker checks the files again: a spec that did not opt in cannot load them.
    spec = resolve_model(str(folder), allow_pickle=True)
    assert spec.allow_pickle
    with pytest.raises(ModelError, match=refusal):
        cogview4.load_pipeline(replace(spec, allow_pickle=False), torch.float32)


def test_pickle_checkpoints_load_with_the_opt_in_and_render_the_same(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    loaded = cogview4.load_pipeline(
        resolve_model(str(tmp_path / "pickled"), allow_pickle=True), torch.float32
    )
    assert weights_digest(loaded) == weights_digest(pipe)
    row = item("x", "a paper crane", 5)
    np.testing.assert_array_equal(
        cogview4.render(loaded, [row], CPU)[0], cogview4.render(pipe, [row], CPU)[0]
    )
