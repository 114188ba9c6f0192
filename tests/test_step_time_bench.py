"""benchmarks/step_time.py's attention-backend plumbing and benchmarks/xdit_peer.py's refusal, on a CPU.

What the GPU figures will mean rests on these: which processors a diffusers attention backend
reaches, that routing through the dispatcher changes the kernel and not the result, and that an
unavailable backend is reported rather than crashing the sweep.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.step_time import (
    backend_call_counter,
    backend_unavailable,
    relate,
    restore_processors,
    route_through_dispatcher,
    tiny_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]


def _one_step_latents(pipe) -> torch.Tensor:
    return pipe(
        prompt="a red fox",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=1,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
    ).frames


def test_a_backend_reaches_cogvideox_attention_only_when_routed_through_the_dispatcher():
    pipe = tiny_pipeline("cogvideox-5b", torch.device("cpu"), torch.float32)
    pipe.transformer.set_attention_backend("_native_math")
    with backend_call_counter("_native_math") as stock_calls:
        stock = _one_step_latents(pipe)
    assert stock_calls[0] == 0  # the stock processor calls F.scaled_dot_product_attention itself

    replaced = route_through_dispatcher(pipe.transformer)
    try:
        assert replaced  # every transformer block's processor
        pipe.transformer.set_attention_backend("_native_math")
        with backend_call_counter("_native_math") as routed_calls:
            routed = _one_step_latents(pipe)
    finally:
        restore_processors(replaced)
        pipe.transformer.set_attention_backend("native")
    assert routed_calls[0] == len(replaced)  # one attention per block, both CFG halves in one call
    torch.testing.assert_close(routed, stock, rtol=1e-4, atol=1e-5)  # another kernel, the same result
    assert all(not hasattr(m.processor, "_attention_backend") for m in replaced)


def test_glm_image_attention_honours_the_backend_without_routing():
    pipe = tiny_pipeline("glm-image", torch.device("cpu"), torch.float32)
    assert route_through_dispatcher(pipe.transformer) == {}  # its processors already dispatch


def test_backends_that_cannot_run_here_say_why():
    cpu = torch.device("cpu")
    assert backend_unavailable("native", cpu, torch.float32) is None
    assert backend_unavailable("_native_math", cpu, torch.float32) is None
    assert "flash-attn" in backend_unavailable("flash", cpu, torch.float32)
    assert backend_unavailable("_native_cudnn", cpu, torch.float32)  # a CUDA-only kernel
    assert "not a diffusers attention backend" in backend_unavailable("fastest", cpu, torch.float32)


def test_rows_are_related_by_path_and_compile():
    def row(path, compiled, seconds, warmup, calls=None):
        return {
            "model": "m",
            "path": path,
            "sdpa_routing": "stock",
            "backend": "native",
            "compile": compiled,
            "status": "ok",
            "seconds_per_step": seconds,
            "warmup_seconds": warmup,
            "backend_calls_per_step": calls,
        }

    rows = relate(
        [
            row("cogdist", False, 2.0, 10.0, 0.0),
            row("stock", False, 1.6, 9.0, 0.0),
            row("cogdist", True, 1.0, 70.0),
            row("stock", True, 0.8, 9.5),
            {**row("cogdist", False, 0, 0), "backend": "flash", "status": "skipped"},
        ]
    )
    eager_cogdist, eager_stock, compiled_cogdist, compiled_stock, skipped = rows
    assert eager_cogdist["cogdist_vs_stock"] == 1.25 and "cogdist_vs_stock" not in eager_stock
    assert compiled_cogdist["compile_seconds"] == 60.0 and compiled_cogdist["cogdist_vs_stock"] == 1.25
    assert "compile_seconds" not in compiled_stock  # it reuses the graph cogdist's warm-up compiled
    assert compiled_stock["backend_calls_per_step"] == 0.0
    assert "cogdist_vs_stock" not in skipped


def test_xdit_peer_stops_with_a_reason_where_xfuser_cannot_run():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.xdit_peer"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "xfuser is not installed" in result.stderr or "needs CUDA GPUs" in result.stderr


def test_the_gpu_check_runs_on_the_tiny_presets(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py --tiny (CogView4 only: every family goes through the same code,
    and each family's compile is tests/test_compile.py's): every stage writes its rows, and what a
    CPU cannot measure is a skipped row with the reason. The compiled rows are traced by dynamo
    without inductor's code generation (--compiler eager): the plumbing, in seconds."""
    import json

    from benchmarks import gpu_check

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = gpu_check.main(
        ["--tiny", "--only", "cogview4", "--steps", "3", "--compiler", "eager", "--results", str(tmp_path)]
    )
    result = json.loads(path.read_text())
    figures = result["families"]["cogview4"]
    ok = [row for row in figures["steps"] if row["status"] == "ok"]
    assert {(row["backend"], row["compile"]) for row in ok} == {("native", False), ("native", True)}
    assert all(row["seconds_per_step"] > 0 and row["mfu"] > 0 for row in ok)
    [compiled] = [row for row in ok if row["compile"]]
    assert "compile_seconds" in compiled  # traced by dynamo ('eager': inductor is tests/test_compile.py's)
    [fp8] = [row for row in figures["steps"] if row.get("quantize") == "fp8"]
    assert fp8["status"] == "skipped" and "compute capability >= 8.9" in fp8["reason"]
    assert [row["offload"] for row in figures["offload"]] == ["none", "model", "group", "sequential"]
    assert {row["reason"] for row in figures["offload"]} == {"peak GPU memory needs a GPU"}
    check = result["render_check"]
    assert check["status"] == "ok" and check["max_difference_per_row"] == [0, 0, 0, 0], check
