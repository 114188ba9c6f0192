"""The CogVideoX family: every task equals the stock diffusers pipeline, rows are batch-independent."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cogdist.inputs import Inputs
from cogdist.models.cogvideox import runner as cogvideox
from cogdist.models.registry import PRESETS, resolve_model
from cogdist.work import WorkItem
from cogdist.worker.offload import place
from cogdist.worker.settings import WorkerSettings

CPU = torch.device("cpu")
MEMORY = WorkerSettings(vae_tiling=True, vae_slicing=True)  # the presets' defaults
RNG = np.random.RandomState(0)
IMAGE = Image.fromarray((RNG.rand(80, 100, 3) * 255).astype(np.uint8))  # resized by the pipeline
VIDEO = [Image.fromarray((RNG.rand(64, 64, 3) * 255).astype(np.uint8)) for _ in range(13)]

# preset -> (task, inputs, num_frames, extra WorkItem fields)
TASKS = {
    "text-to-video": ("tiny-cogvideox", Inputs(), 9, {}),
    "video-to-video": ("tiny-cogvideox", Inputs(video=VIDEO[:9]), 9, {"strength": 0.8}),
    "text-to-video 1.5": ("tiny-cogvideox1.5", Inputs(), 9, {}),
    "video-to-video 1.5": ("tiny-cogvideox1.5", Inputs(video=VIDEO), 13, {"strength": 0.7}),
    "image-to-video": ("tiny-cogvideox-i2v", Inputs(image=IMAGE), 9, {}),
    "control-to-video": ("tiny-cogvideox-fun", Inputs(video=VIDEO[:9]), 9, {}),
}


def digest(pipe) -> str:
    h = hashlib.sha256()
    for module in (pipe.text_encoder, pipe.transformer, pipe.vae):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


_PIPES: dict[str, object] = {}


def pipe_of(preset: str):
    if preset not in _PIPES:
        _PIPES[preset] = place(cogvideox.load_pipeline(PRESETS[preset], torch.float32), CPU, MEMORY)
    return _PIPES[preset]


def row(case: str, item_id: str = "x", prompt: str = "a red fox running", seed: int = 7) -> WorkItem:
    preset, _, frames, extra = TASKS[case]
    task = case.removesuffix(" 1.5")
    return WorkItem(item_id, prompt, None, seed, 64, 64, 4, 6.0, frames, "o.mp4", task=task, **extra)


def stock(pipe, item: WorkItem, inputs: Inputs) -> np.ndarray:
    """The stock diffusers pipeline of the row's task, called as a user of diffusers would."""
    kwargs = dict(
        prompt=item.prompt,
        height=item.height,
        width=item.width,
        num_inference_steps=item.num_inference_steps,
        guidance_scale=item.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(item.seed),
        output_type="np",
    )
    if item.task == "video-to-video":
        kwargs.update(video=inputs.video, strength=item.strength)
    elif item.task == "control-to-video":
        kwargs.update(control_video=inputs.video)
    else:
        kwargs.update(num_frames=item.num_frames)
        if item.task == "image-to-video":
            kwargs.update(image=inputs.image)
    frames = cogvideox.PIPELINES[item.task](**pipe.components)(**kwargs).frames[0]
    return (frames * 255).round().astype(np.uint8)


@pytest.mark.parametrize("case", list(TASKS))
def test_each_task_equals_the_stock_pipeline_and_ignores_its_batch(case):
    preset, inputs, frames, _ = TASKS[case]
    pipe = pipe_of(preset)
    target = row(case)
    alone = cogvideox.render(pipe, [target], CPU, [inputs])[0]
    assert alone.dtype == np.uint8 and alone.shape[1:] == (64, 64, 3)
    np.testing.assert_array_equal(alone, stock(pipe, target, inputs))

    mate = row(case, "m", prompt="a much longer prompt about an owl on a branch at night", seed=8)
    batched = cogvideox.render(pipe, [mate, target], CPU, [inputs, inputs])
    assert np.abs(batched[1].astype(int) - alone).max() <= 1  # same row, other batch
    assert np.abs(batched[0].astype(int) - alone).mean() > 5  # other prompt and seed: other video


def test_frame_counts_follow_the_pipelines():
    assert (
        cogvideox.render(pipe_of("tiny-cogvideox"), [row("text-to-video")], CPU, [Inputs()])[0].shape[0] == 9
    )
    # 1.5 video-to-video: 13 input frames are 4 latent frames; the VAE decodes an even latent
    # count to 4 frames each (stock diffusers behaviour), and the index records what was made.
    v2v = cogvideox.render(
        pipe_of("tiny-cogvideox1.5"), [row("video-to-video 1.5")], CPU, [TASKS["video-to-video 1.5"][1]]
    )
    assert v2v[0].shape[0] == 16


def test_seed_and_prompt_change_the_video():
    pipe = pipe_of("tiny-cogvideox")
    base = cogvideox.render(pipe, [row("text-to-video")], CPU, [Inputs()])[0].astype(int)
    other_seed = cogvideox.render(pipe, [row("text-to-video", seed=8)], CPU, [Inputs()])[0]
    other_prompt = cogvideox.render(pipe, [row("text-to-video", prompt="a blue whale")], CPU, [Inputs()])[0]
    assert np.abs(base - other_seed).mean() > 5
    assert np.abs(base - other_prompt).max() > 10
    assert np.abs(base[0] - base[-1]).mean() > 1  # frames are not all alike


def test_tiny_weights_are_identical_in_every_process():
    code = (
        "from cogdist.models.cogvideox import runner as cogvideox; from tests.test_cogvideox import digest;"
        "print(digest(cogvideox.build_tiny('i2v', 0)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == digest(cogvideox.build_tiny("i2v", 0)) != digest(cogvideox.build_tiny("i2v", 1))


@pytest.mark.parametrize("case", ["image-to-video", "control-to-video"])
def test_saved_pipelines_resolve_and_load_through_from_pretrained(tmp_path, case):
    preset, inputs, _, _ = TASKS[case]
    pipe = pipe_of(preset)
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    spec = resolve_model(str(tmp_path / "saved"))
    assert spec.family == "cogvideox" and spec.tasks == PRESETS[preset].tasks and not spec.tiny
    assert (spec.width, spec.height, spec.num_frames) == (64, 64, 9)
    loaded = place(cogvideox.load_pipeline(spec, torch.float32), CPU, MEMORY)
    assert digest(loaded) == digest(pipe)
    ours = cogvideox.render(loaded, [row(case)], CPU, [inputs])[0]
    assert np.abs(ours.astype(int) - cogvideox.render(pipe, [row(case)], CPU, [inputs])[0]).max() <= 1


def test_pickle_checkpoints_are_refused(tmp_path):
    pipe_of("tiny-cogvideox").save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(Exception, match="safetensors"):
        cogvideox.load_pipeline(resolve_model(str(tmp_path / "pickled")), torch.float32)
