"""--quantize / --quantize-text-encoder through torchao on the CPU: int8 weights hold the tiny
transformer in less than half the bytes and render within a measured tolerance of the unquantized
weights, exactly as stock diffusers renders with the same torchao config at load; a mode a
worker cannot run (fp8 without such a GPU) stops the job at setup with exit 2; a resume with
another mode is refused."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from diffusers import CogView4Pipeline, PipelineQuantizationConfig, TorchAoConfig
from PIL import Image
from torchao.quantization import Int8WeightOnlyConfig

from cogdist.errors import EXIT_REFUSED, ConfigurationError, ResumeConflictError, UsageError
from cogdist.models.cogview4 import runner as cogview4
from cogdist.models.registry import PRESETS, resolve_model
from cogdist.options import RenderOptions
from cogdist.sink.job import check_resume, write_job_record
from cogdist.storage import open_location
from cogdist.work import WorkUnit
from cogdist.worker.quantize import weight_bytes
from tests.inprocess import in_process_worker

ROW = {"id": "a", "prompt": "a red fox in the snow", "seed": 7, "width": 64, "height": 64}
INT8_TOLERANCE = {"max": 8, "mean": 1.0}
"""int8 weights against the float32 ones, tiny CogView4 (measured: max 2/255, mean 0.12/255)."""


def render(tmp_path, name: str, model: str = "tiny-cogview4", **options):
    """(set-up worker, the row's pixels) rendered by an in-process worker."""
    worker, job, pending = in_process_worker([ROW], model, tmp_path / name, steps=3, **options)
    worker.setup()
    [result] = worker.render(WorkUnit(0, (pending[0][0],))).items
    assert result.ok, result.error
    return worker, np.asarray(Image.open(io.BytesIO(job.out.read_bytes(pending[0][0].output))), dtype=int)


def test_int8_halves_the_weights_renders_close_and_equals_stock_diffusers(tmp_path):
    plain, unquantized = render(tmp_path, "plain")
    folder = tmp_path / "tiny-cogview4"
    cogview4.load_pipeline(PRESETS["tiny-cogview4"], torch.float32).save_pretrained(folder)
    worker, quantized = render(tmp_path, "int8", str(folder), quantize="int8", quantize_text_encoder="int8")
    assert weight_bytes(worker.pipe.transformer) * 2 <= weight_bytes(plain.pipe.transformer)
    # The text encoder's linear layers (its embeddings stay: torchao quantizes nn.Linear).
    assert weight_bytes(worker.pipe.text_encoder) < 0.6 * weight_bytes(plain.pipe.text_encoder)
    difference = np.abs(quantized - unquantized)
    assert difference.max() <= INT8_TOLERANCE["max"] and difference.mean() <= INT8_TOLERANCE["mean"], (
        difference.max(),
        difference.mean(),
    )
    # Stock diffusers, the same config given at load.
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    stock = CogView4Pipeline.from_pretrained(folder, quantization_config=config, torch_dtype=torch.float32)
    ours, pixels = render(tmp_path, "int8-transformer", str(folder), quantize="int8")
    image = stock(
        ROW["prompt"],
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=ours.spec.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(ROW["seed"]),
    ).images[0]
    np.testing.assert_array_equal(pixels, np.asarray(image, dtype=int))


def test_a_mode_the_worker_cannot_run_stops_the_job_at_setup_with_exit_2(tmp_path):
    worker, _, _ = in_process_worker([ROW], "tiny-cogview4", tmp_path / "out", quantize="fp8")
    with pytest.raises(
        ConfigurationError, match="--quantize fp8 needs a GPU of compute capability >= 8.9.*no CUDA GPU"
    ) as raised:
        worker.setup()
    assert raised.value.exit_code == EXIT_REFUSED


def test_the_driver_checks_the_mode_and_a_resume_keeps_it(tmp_path):
    spec = resolve_model("tiny-cogview4")
    with pytest.raises(UsageError, match="--quantize 'int4': choose one of none, int8, int8-dynamic, fp8"):
        RenderOptions("m", "tiny-cogview4", "o", quantize="int4").check(spec)
    with pytest.raises(UsageError, match="--quantize-text-encoder 'x'"):
        RenderOptions("m", "tiny-cogview4", "o", quantize_text_encoder="x").check(spec)
    out = open_location(str(tmp_path / "out"))
    settings = RenderOptions("m", "tiny-cogview4", "o").resolved(spec).job_settings(spec, ["id"])
    assert settings.settings["quantize"] is None and settings.settings["quantize_text_encoder"] is None
    write_job_record(out, settings)
    quantized = (
        RenderOptions("m", "tiny-cogview4", "o", quantize="int8").resolved(spec).job_settings(spec, ["id"])
    )
    with pytest.raises(ResumeConflictError, match="--quantize"):
        check_resume(out, quantized)


def test_bnb_8bit_without_bitsandbytes_stops_at_setup_and_is_refused_with_offload(tmp_path, monkeypatch):
    """bitsandbytes is not in the test extra (it costs the suite's budget), so its import is
    blocked here whether or not it is installed: the worker names the missing package (exit 2).
    With bitsandbytes 0.50.2 installed by hand, bnb-8bit rendered tiny CogView4 within 2/255 (mean
    0.14/255) of fp32, every linear layer of its transformer holding int8 weights (README)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    worker, _, _ = in_process_worker([ROW], "tiny-cogview4", tmp_path / "out", quantize="bnb-8bit")
    with pytest.raises(ConfigurationError, match="bnb-8bit needs bitsandbytes on every worker") as raised:
        worker.setup()
    assert raised.value.exit_code == EXIT_REFUSED
    with pytest.raises(UsageError, match="bnb-8bit with --offload model: .* cannot move"):
        RenderOptions("m", "tiny-cogview4", "o", quantize="bnb-8bit", offload="model").check(
            resolve_model("tiny-cogview4")
        )
