"""Sequence parallelism of each family's transformer over a real gloo group equals one rank."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cogdist.models.registry import PRESETS, family
from cogdist.parallel.group import Layout
from cogdist.parallel.sequence import apply_sequence_parallel
from cogdist.work import WorkItem
from tests.distributed import run_gang

TOLERANCE = 1e-4

# preset -> (task, frames): one row whose first transformer call is captured and replayed.
CASES = {
    "tiny-cogview4": ("text-to-image", None),
    "tiny-glm-image": ("text-to-image", None),
    "tiny-cogvideox": ("text-to-video", 9),
    "tiny-cogvideox1.5": ("text-to-video", 9),
    "tiny-cogvideox-i2v": ("image-to-video", 9),
}


class _Captured(Exception):
    pass


def first_transformer_call(
    preset: str, size: int = 64, frames: int | None = None, prompt: str = "a red fox in the snow"
) -> tuple:
    """(transformer, args, kwargs) of the first denoising call of a one-row render (also used by
    benchmarks/sp_collectives.py)."""
    spec = PRESETS[preset]
    runner = family(spec.family).load_runner()
    pipe = runner.load(spec, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    task, default_frames = CASES[preset]
    item = WorkItem("x", prompt, None, 7, size, size, 2, 6.0, frames or default_frames, "o", task=task)
    captured = {}

    def capture(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    inputs = [_inputs(task)]
    with contextlib.suppress(_Captured):
        runner.render(pipe, [item], torch.device("cpu"), inputs)
    handle.remove()
    return pipe.transformer, captured["args"], captured["kwargs"]


def _inputs(task: str):
    import numpy as np
    from PIL import Image

    from cogdist.inputs import Inputs

    if task == "image-to-video":
        return Inputs(image=Image.fromarray(np.full((64, 64, 3), 100, np.uint8)))
    return Inputs()


@torch.no_grad()
def sharded_forwards(gang, modes: list[tuple[str, bool]]) -> dict[tuple[str, bool], tuple]:
    """(SP=1 output, SP=K output) of each preset's transformer, in each mode, on this rank."""
    outputs = {}
    for preset, uneven in modes:
        transformer, args, kwargs = first_transformer_call(preset)
        reference = transformer(*args, **kwargs)[0]
        apply_sequence_parallel(transformer, gang, uneven=uneven)
        outputs[(preset, uneven)] = (reference, transformer(*args, **kwargs)[0])
    return outputs


# Even splits where the tiny rows' token counts divide by 2 (CogView4: 16 text + 16 image tokens;
# CogVideoX: 226 + 48); the uneven mode at 2 and 3 for every family. One gang per degree.
MODES = {
    2: [(p, False) for p in ("tiny-cogview4", "tiny-cogvideox")] + [(p, True) for p in CASES],
    3: [(p, True) for p in CASES],
}


@pytest.mark.parametrize("sp", list(MODES))
def test_sharded_transformers_equal_one_rank(sp):
    results = run_gang(Layout(sp=sp), sharded_forwards, MODES[sp])
    assert len(results) == sp
    for rank, outputs in results.items():
        assert list(outputs) == MODES[sp]
        for (preset, uneven), (reference, sharded) in outputs.items():
            assert sharded.shape == reference.shape, preset
            difference = (sharded - reference).abs().max().item()
            assert difference <= TOLERANCE, (
                f"{preset} uneven={uneven} rank {rank}: max |SP{sp} - SP1| = {difference:.2e}"
            )
