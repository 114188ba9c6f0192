"""--offload none|model|group|sequential: the driver's checks, the old --cpu-offload flags, group
offloading through diffusers' hooks (run here with the CPU as its onload device: the weights'
round trip is a GPU's, the hooks and the pixels are the same), and an out-of-memory retry that
never adds a second offload to one already set."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.hooks.group_offloading import _is_group_offload_enabled

from cogdist.cli import build_parser
from cogdist.errors import UsageError
from cogdist.models.registry import resolve_model
from cogdist.options import RenderOptions
from cogdist.work import WorkUnit
from cogdist.worker.offload import GROUP, offload_pipeline, saving_memory
from tests.inprocess import in_process_worker

ROWS = [{"id": "a", "prompt": "a red fox", "seed": 3}]


def test_the_driver_checks_the_mode_against_the_gang_and_compile():
    spec = resolve_model("tiny-cogview4")
    RenderOptions("m", "tiny-cogview4", "o", offload="model", sp=2).check(spec)
    RenderOptions("m", "tiny-cogview4", "o", offload="group", compile=True).check(spec)
    with pytest.raises(UsageError, match="--offload 'fast': choose one of none, model, group, sequential"):
        RenderOptions("m", "tiny-cogview4", "o", offload="fast").check(spec)
    with pytest.raises(UsageError, match="--offload group in a gang of 2 GPUs"):
        RenderOptions("m", "tiny-cogview4", "o", offload="group", sp=2).check(spec)
    with pytest.raises(UsageError, match="--compile with --offload sequential"):
        RenderOptions("m", "tiny-cogview4", "o", offload="sequential", compile=True).check(spec)


@pytest.mark.parametrize(
    "flags,offload",
    [
        ([], None),
        (["--offload", "group"], "group"),
        (["--cpu-offload"], "model"),
        (["--no-cpu-offload"], "none"),
    ],
)
def test_the_cpu_offload_flags_of_earlier_versions_still_work(flags, offload):
    args = build_parser().parse_args(
        ["render", "m.parquet", "--model", "tiny-cogview4", "--out", "o", *flags]
    )
    assert args.offload == offload
    options = RenderOptions("m", "tiny-cogview4", "o", offload=offload)
    spec = resolve_model("tiny-cogview4")
    assert options.resolved(spec).job_settings(spec, ["id"]).recorded["offload"] == (offload or "none")


def test_group_offload_renders_the_same_pixels(tmp_path):
    rendered = {}
    for name in ("resident", "group"):
        worker, job, pending = in_process_worker(ROWS, "tiny-cogview4", tmp_path / name, steps=2)
        worker.setup()
        if name == "group":
            offload_pipeline(worker.pipe, torch.device("cpu"), GROUP)
            assert _is_group_offload_enabled(worker.pipe.transformer)
            assert _is_group_offload_enabled(worker.pipe.vae)
        [result] = worker.render(WorkUnit(0, (pending[0][0],))).items
        assert result.ok, result.error
        rendered[name] = job.out.read_bytes(pending[0][0].output)
    assert rendered["group"] == rendered["resident"]


class RecordingPipeline:
    """What saving_memory calls on a pipeline, recorded (on a CPU, diffusers refuses model
    offload: it needs an accelerator)."""

    def __init__(self):
        self.calls: list[str] = []
        self.vae = self

    def __getattr__(self, name):
        if name.startswith(("enable_", "disable_", "remove_", "to")):
            return lambda *args, **kwargs: self.calls.append(name)
        raise AttributeError(name)


@pytest.mark.parametrize(
    "offload,quantize,added",
    [("none", "none", True), ("model", "none", False), ("group", "none", False), ("none", "bnb-8bit", False)],
)
def test_the_out_of_memory_retry_adds_model_offload_only_where_none_is_set(offload, quantize, added):
    """...and never to bitsandbytes' 8-bit weights, which cannot leave their device."""
    from cogdist.worker.settings import WorkerSettings

    pipe = RecordingPipeline()
    settings = replace(WorkerSettings(), offload=offload, quantize=quantize)
    with saving_memory(pipe, torch.device("cuda", 0), settings):
        assert {"enable_tiling", "enable_slicing"} <= set(pipe.calls)
        assert ("enable_model_cpu_offload" in pipe.calls) == added, pipe.calls
    offloads = [call for call in pipe.calls if "offload" in call]
    assert offloads == ["enable_model_cpu_offload"] * added, pipe.calls
    if added:  # and removed after: the worker's own placement again
        after = pipe.calls[pipe.calls.index("enable_model_cpu_offload") :]
        assert after.index("remove_all_hooks") < after.index("to"), pipe.calls
