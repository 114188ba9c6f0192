"""Whole renders in a gang (sequence, CFG and VAE parallelism together) match one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cogdist.inputs import Inputs
from cogdist.models.registry import PRESETS, family
from cogdist.parallel.broadcast import drop_first_rank_models
from cogdist.parallel.group import Layout
from cogdist.parallel.pipeline import parallelize
from cogdist.work import WorkItem
from cogdist.worker.offload import place
from cogdist.worker.settings import WorkerSettings
from tests.distributed import run_gang

CPU = torch.device("cpu")
PIXELS = 2  # of 255, per pixel
IMAGE = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))

# name -> (preset, task, frames, inputs, size)
CASES = {
    "cogview4": ("tiny-cogview4", "text-to-image", None, Inputs(), 64),
    "cogview4 tiled": ("tiny-cogview4", "text-to-image", None, Inputs(), 128),
    "glm t2i": ("tiny-glm-image", "text-to-image", None, Inputs(), 64),
    "glm i2i": ("tiny-glm-image", "image-to-image", None, Inputs(image=IMAGE), 64),
    "cogvideox t2v": ("tiny-cogvideox", "text-to-video", 9, Inputs(), 64),
    "cogvideox1.5 t2v": ("tiny-cogvideox1.5", "text-to-video", 9, Inputs(), 64),
    "cogvideox i2v": ("tiny-cogvideox-i2v", "image-to-video", 9, Inputs(image=IMAGE), 64),
}


def _pipe(name: str, gang=None):
    """The pipeline as a worker sets it up (one process, or this rank of `gang`)."""
    preset, _, _, _, size = CASES[name]
    spec = PRESETS[preset]
    declared = family(spec.family)
    runner = declared.load_runner()
    tiling = spec.vae_tiling or size > 64  # "tiled": a 128 px CogView4 image is 4 VAE tiles
    settings = WorkerSettings(vae_tiling=tiling, vae_slicing=spec.vae_slicing)
    pipe = runner.load(spec, torch.float32)
    drop_first_rank_models(pipe, gang, declared.first_rank_models)
    pipe = place(pipe, CPU, settings)
    if gang is not None:
        parallelize(pipe, gang, declared.cfg_parallel)
    return runner, pipe


def _render(name: str, gang=None) -> tuple[np.ndarray, list[int], int]:
    """The render, the rows x tokens this rank's transformer projected out in each pass, and
    how often this rank ran its text encoder (GLM-Image: its AR model)."""
    preset, task, frames, inputs, size = CASES[name]
    runner, pipe = _pipe(name, gang)
    passes: list[int] = []
    pipe.transformer.proj_out.register_forward_hook(
        lambda module, args, out: passes.append(args[0].shape[0] * args[0].shape[1])
    )
    # GLM-Image: its AR model (the pipeline itself embeds the empty negative glyphs on every
    # rank, a few tokens); the others: their text encoder.
    encoder = pipe.vision_language_encoder if hasattr(pipe, "vision_language_encoder") else pipe.text_encoder
    encodes: list[int] = []
    if encoder is not None:  # dropped on ranks but the first
        encoder.register_forward_hook(lambda module, args, out: encodes.append(1))
    item = WorkItem("x", "a red fox in the snow", None, 7, size, size, 3, 5.0, frames, "o", task=task)
    prepared = runner.prepare_inputs(item, inputs)
    return runner.render(pipe, [item], CPU, [prepared], gang=gang)[0], passes, len(encodes)


def renders(gang, names: list[str]) -> dict[str, tuple]:
    """(one process, this gang) renders of each case, on this rank."""
    return {name: (_render(name), _render(name, gang)) for name in names}


LAYOUTS = {
    "sp2": (Layout(sp=2), list(CASES)),
    "sp3": (Layout(sp=3), ["cogview4", "glm t2i", "cogvideox t2v"]),
    "cfg2": (Layout(cfg=2), list(CASES)),
    "sp2 x cfg2": (Layout(sp=2, cfg=2), ["cogview4 tiled", "glm i2i", "cogvideox1.5 t2v"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gang_render_matches_one_process(layout):
    gang_layout, names = LAYOUTS[layout]
    results = run_gang(gang_layout, renders, names)
    for name in names:
        (single, single_passes, _), (sharded, gang_passes, encodes) = results[0][name]  # rank 0 writes
        assert sharded.shape == single.shape, name
        difference = np.abs(sharded.astype(int) - single.astype(int)).max()
        assert difference <= PIXELS, f"{name} on {layout}: max pixel difference {difference}"
        assert single.std() > 5, f"{name}: a flat render proves nothing"
        # The work really was divided: a share of the tokens, and with CFG parallelism one of
        # the two passes (or half the batch [uncond; cond]) per step.
        assert sum(gang_passes) <= 0.75 * sum(single_passes), (name, gang_passes, single_passes)
        # Prompts (and GLM-Image's AR prior) were encoded on rank 0 alone, then broadcast.
        assert encodes > 0 and all(results[rank][name][1][2] == 0 for rank in results if rank), name
