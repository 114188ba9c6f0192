"""Step checkpoints: a video render interrupted mid-loop resumes from its last saved step and
gives exactly the uninterrupted output, for each CogVideoX task (DPM and DDIM schedulers)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cogdist.models.cogvideox import runner as cogvideox
from cogdist.storage import open_location
from cogdist.worker.checkpoint import CHECKPOINTS, StepCheckpoints, checkpoint_path
from tests.conftest import (
    cli,
    committed_rows,
    driver_env,
    kill_driver_when,
    probe_mp4,
    read_table,
    write_manifest,
)
from tests.inprocess import render_in_process
from tests.test_cogvideox import TASKS, pipe_of, row

CPU = torch.device("cpu")
STEPS = 6


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def no_hooks_left():
    """The pipelines are shared with test_cogvideox: leave them as they were."""
    yield
    for case in TASKS.values():
        pipe_of(case[0]).transformer.transformer_blocks[0]._forward_pre_hooks.clear()


def count_transformer_work(pipe) -> list[int]:
    """A counter of real transformer passes: its first block runs only when the model computes."""
    calls = [0]

    def count(module, args, kwargs):
        calls[0] += 1

    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    return calls


def interrupt_at_pass(pipe, number: int):
    """Raise (as a killed process would stop) at the `number`-th real transformer pass."""
    seen = [0]

    def stop(module, args, kwargs):
        seen[0] += 1
        if seen[0] == number:
            raise Interrupted()

    return pipe.transformer.transformer_blocks[0].register_forward_pre_hook(stop, with_kwargs=True)


def render(pipe, items, inputs, checkpoints=None):
    return cogvideox.render(pipe, items, CPU, inputs, checkpoints=checkpoints)


@pytest.mark.parametrize("case", ["text-to-video", "image-to-video", "control-to-video", "text-to-video 1.5"])
def test_a_render_interrupted_mid_loop_resumes_and_equals_the_uninterrupted_one(tmp_path, case):
    pipe = pipe_of(TASKS[case][0])
    item = row(case)
    item = type(item)(**{**vars(item), "num_inference_steps": STEPS, "output": f"outputs/{case}.mp4"})
    inputs = [TASKS[case][1]]
    expected = render(pipe, [item], inputs)[0]

    out = open_location(str(tmp_path / "out"))
    saving = StepCheckpoints(out, every_steps=2)
    hook = interrupt_at_pass(pipe, 5)  # after steps 1-4 are done and 2 and 4 were saved
    with pytest.raises(Interrupted):
        render(pipe, [item], inputs, saving)
    hook.remove()
    assert out.exists(checkpoint_path(item))

    resuming = StepCheckpoints(out, every_steps=2)
    passes = count_transformer_work(pipe)
    resumed = render(pipe, [item], inputs, resuming)[0]
    assert resuming.resumed == [(item.id, 4)]
    assert passes[0] == STEPS - 4, "the steps saved before the interruption were computed again"
    np.testing.assert_array_equal(resumed, expected)

    resuming.remove([item])
    assert not out.exists(checkpoint_path(item))


def test_a_batch_resumes_together_and_stale_or_partial_checkpoints_are_ignored(tmp_path):
    pipe = pipe_of("tiny-cogvideox")
    first, second = row("text-to-video", "a", seed=1), row("text-to-video", "b", "a boat at sea", seed=2)
    first = type(first)(**{**vars(first), "num_inference_steps": STEPS, "output": "outputs/a.mp4"})
    second = type(second)(**{**vars(second), "num_inference_steps": STEPS, "output": "outputs/b.mp4"})
    items, inputs = [first, second], [TASKS["text-to-video"][1]] * 2
    expected = render(pipe, items, inputs)

    out = open_location(str(tmp_path / "out"))
    hook = interrupt_at_pass(pipe, 4)
    with pytest.raises(Interrupted):
        render(pipe, items, inputs, StepCheckpoints(out, every_steps=1))
    hook.remove()

    resuming = StepCheckpoints(out, every_steps=1)
    np.testing.assert_array_equal(np.stack(render(pipe, items, inputs, resuming)), np.stack(expected))
    assert resuming.resumed == [("a", 3), ("b", 3)]

    # Another seed for the same output name: the checkpoint is someone else's state.
    changed = type(first)(**{**vars(first), "seed": 99})
    fresh = StepCheckpoints(out, every_steps=1)
    render(pipe, [changed], inputs[:1], fresh)
    assert fresh.resumed == []

    # One row of a batch without a checkpoint: the batch starts over together.
    out.delete(checkpoint_path(second))
    fresh = StepCheckpoints(out, every_steps=1)
    hook = interrupt_at_pass(pipe, 1)
    with pytest.raises(Interrupted):
        render(pipe, items, inputs, fresh)
    hook.remove()
    assert fresh.resumed == []


def test_time_based_default_saves_only_long_items_and_a_damaged_file_is_ignored(tmp_path):
    pipe = pipe_of("tiny-cogvideox")
    item = row("text-to-video")
    item = type(item)(**{**vars(item), "num_inference_steps": STEPS, "output": "outputs/t.mp4"})
    inputs = [TASKS["text-to-video"][1]]
    out = open_location(str(tmp_path / "out"))

    render(pipe, [item], inputs, StepCheckpoints(out))  # quick: nothing is worth saving
    assert not out.exists(checkpoint_path(item))
    render(pipe, [item], inputs, StepCheckpoints(out, every_seconds=0.0))  # "long": every step
    assert out.exists(checkpoint_path(item))

    out.write_bytes(checkpoint_path(item), b"not a checkpoint")
    expected = render(pipe, [item], inputs)[0]
    resuming = StepCheckpoints(out, every_steps=2)
    np.testing.assert_array_equal(render(pipe, [item], inputs, resuming)[0], expected)
    assert resuming.resumed == []
    assert (tmp_path / "out" / CHECKPOINTS).is_dir()


def saved_step(folder: Path) -> int:
    """The step of the (one) checkpoint under `folder`, 0 while there is none."""
    for path in folder.rglob("*.pt"):
        try:
            return torch.load(path, weights_only=True)["step"]
        except Exception:  # being replaced right now
            return 0
    return 0


@pytest.mark.e2e
def test_a_driver_killed_mid_item_resumes_from_the_checkpoint_and_equals_an_uninterrupted_render(tmp_path):
    long_row = {"id": "long/1", "prompt": "a long walk on a beach"}
    manifest = write_manifest(tmp_path / "m.parquet", [long_row])
    size = {"width": 96, "height": 96, "frames": 17, "steps": 20}
    settings = [f"--{name}={value}" for name, value in size.items()]
    settings += ["--model", "tiny-cogvideox", "--replicas", "1", "--step-checkpoint", "3"]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cogdist", "render", str(manifest), "--out", str(out), *settings]
    # The kill waits for the item's progress: step 6 of 20 saved.
    kill_driver_when(command, lambda: saved_step(out / CHECKPOINTS) >= 6, env=driver_env())
    killed_at = saved_step(out / CHECKPOINTS)
    assert committed_rows(str(out)) == 0, "the item finished before the kill"

    resumed = cli("render", str(manifest), "--out", str(out), *settings)
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resuming long/1 from step (\d+)", resumed.stderr)
    assert match and int(match.group(1)) >= killed_at, resumed.stderr[-2000:]
    assert list((out / CHECKPOINTS).rglob("*.pt")) == [], "the finished item's checkpoint is still there"

    # The uninterrupted render: one worker in this process with the CPUs the CLI's worker had
    # (the embedded instance's, all of them, for its one replica).
    reference = tmp_path / "reference"
    render_in_process([long_row], "tiny-cogvideox", reference, threads=os.cpu_count(), **size)
    [resumed_row] = read_table(str(out))[0].to_pylist()
    plain = (reference / resumed_row["path"]).read_bytes()
    assert resumed_row["sha256"] == hashlib.sha256(plain).hexdigest()
    data = (out / resumed_row["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == resumed_row["sha256"] and len(data) == resumed_row["bytes"]
    assert probe_mp4(out / resumed_row["path"])[1].shape == (17, 96, 96, 3)


def test_finished_rows_lose_their_checkpoints_even_when_their_batch_started_over(tmp_path):
    pipe = pipe_of("tiny-cogvideox")
    first, second = row("text-to-video", "a", seed=1), row("text-to-video", "b", "a boat at sea", seed=2)
    first = type(first)(**{**vars(first), "num_inference_steps": STEPS, "output": "outputs/a.mp4"})
    second = type(second)(**{**vars(second), "num_inference_steps": STEPS, "output": "outputs/b.mp4"})
    inputs = [TASKS["text-to-video"][1]] * 2
    out = open_location(str(tmp_path / "out"))
    hook = interrupt_at_pass(pipe, 3)
    with pytest.raises(Interrupted):
        render(pipe, [second], inputs[:1], StepCheckpoints(out, every_steps=1))
    hook.remove()
    assert out.exists(checkpoint_path(second))

    worker = StepCheckpoints(out, every_steps=100)  # a new worker; saves nothing itself
    render(pipe, [first, second], inputs, worker)  # "a" has no checkpoint: the batch starts over
    assert worker.resumed == []
    worker.remove([first, second])
    assert not out.exists(checkpoint_path(second))
