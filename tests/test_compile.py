"""--compile: the transformer's repeated blocks compiled by inductor (on a CPU, with gcc), one
compile per shape bucket and worker, the compile timed apart from the render, inductor's cache on
the node's disk. One compile test per family (a cold compile costs 10-30 s of CPU here); the
gang (--sp 2 --cfg-parallel) is tests/test_gang_e2e.py's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from cogdist.errors import UsageError
from cogdist.models.registry import resolve_model
from cogdist.options import RenderOptions
from cogdist.work import WorkUnit
from cogdist.worker.compile import COMPILE_CACHE, repeated_blocks, use_node_cache
from tests.inprocess import in_process_worker

ROWS = [
    {"id": "a", "prompt": "a red fox", "seed": 3},
    {"id": "b", "prompt": "a red fox", "seed": 4},  # the same shapes: the prompt's length too
]
# A video's frames are compared as PNGs (--save-frames): H.264 would amplify a rounding step.
FAMILIES = [
    ("tiny-cogview4", {}),
    ("tiny-cogvideox", {"frames": 9, "save_frames": True}),
    ("tiny-glm-image", {}),
]
COMPILED = {"tiny-cogvideox": {"step_checkpoint": 1}}
"""What the compiled render adds: CogVideoX saves its denoising state at every step meanwhile."""


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A cold inductor cache of the test's own, and dynamo's in-memory state reset around it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield tmp_path / "inductor"
    torch._dynamo.reset()


def test_compile_is_refused_with_a_step_cache_and_caches_on_the_nodes_disk(tmp_path, monkeypatch):
    spec = resolve_model("tiny-cogview4")
    with pytest.raises(UsageError, match="--compile with --cache taylorseer: .* choose one"):
        RenderOptions("m", "tiny-cogview4", "o", compile=True, cache="taylorseer").check(spec)
    video = resolve_model("tiny-cogvideox")
    RenderOptions("m", "tiny-cogvideox", "o", compile=True, step_checkpoint=1).check(video)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert use_node_cache() == str(tmp_path / COMPILE_CACHE.relative_to("~"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_node_cache() == str(tmp_path / "mine")  # the user's choice wins


def render_units(worker, pending) -> list:
    """Each row as a unit of its own, in order: their ItemResults."""
    return [worker.render(WorkUnit(n, (item,))).items[0] for n, (item, _) in enumerate(pending)]


def rendered(tmp_path, name: str, model: str, **options) -> tuple[object, list, list[np.ndarray]]:
    """(set-up worker, its ItemResults, each row's pixels: an image or a video's PNG frames)."""
    worker, job, pending = in_process_worker(ROWS, model, tmp_path / name, **options)
    worker.setup()
    results = render_units(worker, pending)
    assert all(r.ok for r in results), [r.error for r in results]
    pixels = []
    for (item, _), result in zip(pending, results):
        if item.frames_dir:
            frames = [job.out.read_bytes(f"{item.frames_dir}/{n:06d}.png") for n in range(result.frames)]
            pixels.append(np.stack([np.asarray(Image.open(io.BytesIO(f)), dtype=int) for f in frames]))
        else:
            pixels.append(np.asarray(Image.open(io.BytesIO(job.out.read_bytes(item.output))), dtype=int))
    return worker, results, pixels


@pytest.mark.parametrize("model,extra", FAMILIES)
def test_the_compiled_blocks_render_as_eager_does_and_compile_a_shape_once(
    tmp_path, inductor_cache, model, extra
):
    """Two units of one shape: the first compiles (its compile time apart from its render time),
    the second reuses it; the pixels are eager's within 1/255. For CogView4, a second worker (a
    rebuilt replica: dynamo's state gone, the node's disk kept) compiles from inductor's cache.
    CogVideoX saves step checkpoints meanwhile (they hold latents, outside the compiled blocks)."""
    options = {"steps": 2, "width": 64, "height": 64, **extra}
    _, _, eager = rendered(tmp_path, "eager", model, **options)
    worker, (first, second), compiled = rendered(
        tmp_path, "compiled", model, compile=True, **options, **COMPILED.get(model, {})
    )
    blocks = repeated_blocks(worker.pipe.transformer)
    assert len(blocks) >= 2 and all(block._compiled_call_impl is not None for block in blocks)
    assert first.compile_seconds > 0 and first.render_seconds > 0
    assert worker.compile_clock.compiles >= 1 and counters["inductor"]["fxgraph_cache_miss"] >= 1
    assert second.compile_seconds == 0.0, "the second unit of the shape compiled again"
    for row, one, other in zip(ROWS, eager, compiled):
        assert one.shape == other.shape
        assert np.abs(one - other).max() <= 1, (row["id"], np.abs(one - other).max())
    if model != "tiny-cogview4":
        return
    torch._dynamo.reset()
    _, (result, _), _ = rendered(tmp_path, "again", model, compile=True, **options)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
    assert 0 < result.compile_seconds < first.compile_seconds
