"""The GPU check: what only a GPU can show, in one command for the first GPU that is lent.

    python -m benchmarks.gpu_check [--only cogview4|cogvideox|glm_image] [--steps 4]
    python -m benchmarks.gpu_check --tiny     # the same code on the tiny presets, on a CPU (the suite runs it)

Family by family, at real size (random bf16 weights from the real checkpoints' configs, no
download: benchmarks/step_time.py builds them), on cogdist's render path:
- seconds per denoising step and MFU (against the bf16 matmul peak measured first) with the
  native attention and each exact backend this GPU runs (cogdist.worker.attention.AUTO_ORDER),
  eager and with `--compile` (its compile seconds), and with `--quantize fp8`;
- peak GPU memory of a short render under each `--offload` tier;
then one 4-row render of CogView4-6B at 1024x1024, 8 steps, through the family's render path and
cogdist's PNG encoding, checked against the stock pipeline on the same weights and seeds.

The GPU machines this project can borrow have torch, transformers and pyarrow but neither Ray nor
diffusers, and reach no package registry: `benchmarks/gpu_wheels.sh` downloads the wheels to
carry (diffusers, torchao), and the check runs the worker side in this one process. Results are
written to benchmarks/results/gpu_check.json (gpu_check_tiny.json with --tiny) after every stage,
so a run cut off by its time limit still returns what it measured; `--budget` seconds (default
270: a lent GPU command gets 10 minutes, a check is meant to take 5) skips the stages left,
recording why.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, family_runner, save
from benchmarks.step_time import MODELS, backend_unavailable, matmul_peak, pipeline, run
from cogdist.worker.attention import AUTO_ORDER, NATIVE
from cogdist.worker.offload import OFFLOAD_MODES, offload_pipeline

FAMILIES = {"cogview4": "cogview4-6b", "cogvideox": "cogvideox-5b", "glm_image": "glm-image"}
"""--only's values (cogdist's family names) -> the model benchmarks/step_time.py builds."""
RENDER_ROWS = 4


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)


def exact_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """native and the exact backends of --attention-backend auto's order that run here."""
    return [NATIVE] + [b for b in AUTO_ORDER if b != NATIVE and backend_unavailable(b, device, dtype) is None]


def step_rows(name: str, tiny: bool, steps: int, device, dtype, peak: float, compiler: str) -> list[dict]:
    """s/step and MFU: every exact backend eager, then compiled; then fp8 (a skipped row with the
    reason where this device cannot run it)."""
    common = {"paths": ("cogdist",), "compile_backend": compiler, "routings": ["dispatcher"], "peak": peak}
    rows = run(name, tiny, steps, device, dtype, exact_backends(device, dtype), [False, True], **common)
    try:
        rows += run(name, tiny, steps, device, dtype, [NATIVE], [False, True], quantize="fp8", **common)
    except Exception as error:  # fp8 needs compute capability >= 8.9: a row, not a crash
        rows.append({"model": name, "quantize": "fp8", "status": "skipped", "reason": str(error)[:300]})
    return rows


def offload_rows(name: str, tiny: bool, device, dtype) -> list[dict]:
    """Peak GPU memory of a 2-step render under each --offload tier (the pipeline built anew for
    each: offloading moves its weights)."""

    if device.type != "cuda":
        return [
            {"model": name, "offload": t, "status": "skipped", "reason": "peak GPU memory needs a GPU"}
            for t in OFFLOAD_MODES
        ]
    rows = []
    for tier in OFFLOAD_MODES:
        pipe = pipeline(name, tiny, device, dtype)
        try:
            if tier != "none":
                pipe.to("cpu")
                offload_pipeline(pipe, device, tier)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            _short_render(name, pipe, device)
            rows.append(
                {
                    "model": name,
                    "offload": tier,
                    "status": "ok",
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                    "render_seconds": round(time.perf_counter() - start, 2),
                }
            )
        except Exception as error:
            rows.append(
                {
                    "model": name,
                    "offload": tier,
                    "status": "failed",
                    "reason": f"{type(error).__name__}: {error}"[:300],
                }
            )
        del pipe
        torch.cuda.empty_cache()
    return rows


def _short_render(name: str, pipe, device) -> None:
    family, _, _, width, height, frames, guidance = MODELS[name]
    kwargs = {"height": height, "width": width, "guidance_scale": guidance, "num_inference_steps": 2}
    if frames:
        kwargs["num_frames"] = frames
    if family == "glm_image":
        codebook = pipe.transformer.config.prior_vq_quantizer_codebook_size
        kwargs["prior_token_ids"] = torch.randint(
            0, codebook, (1, 4 * (height // 32) * (width // 32)), device=device
        )
    pipe(prompt="a red fox", generator=torch.Generator("cpu").manual_seed(1), output_type="np", **kwargs)


def render_check(tiny: bool, device, dtype) -> dict:
    """RENDER_ROWS rows of CogView4-6B (tiny: its tiny preset) at 1024x1024 (tiny: 64x64), 8 steps,
    through the family's render path and PNG encoding, against the stock pipeline's images."""
    from PIL import Image

    from cogdist.inputs import Inputs
    from cogdist.sink.encode import encode_image
    from cogdist.work import WorkItem

    pipe = pipeline("cogview4-6b", tiny, device, dtype)
    size = 64 if tiny else 1024
    runner = family_runner("cogview4")
    items = [
        WorkItem(
            f"r{i}", f"a lighthouse at dusk, study {i}", None, 100 + i, size, size, 8, 3.5, None, f"r{i}.png"
        )
        for i in range(RENDER_ROWS)
    ]
    start = time.perf_counter()
    ours = [runner.render(pipe, [item], device, [Inputs()])[0] for item in items]
    encoded = [encode_image(pixels, "png") for pixels in ours]
    seconds = time.perf_counter() - start
    stock = [
        np.asarray(
            pipe(
                item.prompt,
                height=size,
                width=size,
                num_inference_steps=8,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(item.seed),
            ).images[0]
        )
        for item in items
    ]
    differences = [
        int(np.abs(np.asarray(Image.open(io.BytesIO(png)), int) - s.astype(int)).max())
        for png, s in zip(encoded, stock)
    ]
    return {
        "model": "cogview4-6b" + (" (tiny preset)" if tiny else ""),
        "rows": RENDER_ROWS,
        "size": size,
        "steps": 8,
        "status": "ok" if max(differences) == 0 else "differs",
        "max_difference_per_row": differences,
        "seconds_per_row": round(seconds / RENDER_ROWS, 3),
        "sha256": [hashlib.sha256(png).hexdigest() for png in encoded],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(FAMILIES), action="append", help="one family (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="the tiny presets on whatever device is here")
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="denoising steps of a measured render (the first interval is warm-up; >= 3)",
    )
    parser.add_argument(
        "--compiler",
        default="inductor",
        help="torch.compile backend of the compiled rows (inductor, as --compile; the suite's --tiny run "
        "traces with 'eager' to check the plumbing without paying for inductor's code generation)",
    )
    parser.add_argument(
        "--budget", type=float, default=270.0, help="seconds after which the stages left are skipped"
    )
    parser.add_argument(
        "--output", default=None, help="results file name (default gpu_check, gpu_check_tiny)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the GPU check needs a GPU; --tiny runs the same code on the tiny presets here")
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    budget = Budget(args.budget)
    output = args.output or ("gpu_check_tiny" if args.tiny else "gpu_check")
    result: dict = {"dtype": str(dtype), "budget_seconds": args.budget, "families": {}, "render_check": None}
    result["matmul_peak_tflops"] = round(matmul_peak(device, dtype) / 1e12, 3)
    peak = result["matmul_peak_tflops"] * 1e12
    path = save(output, result, args.results)
    for family in args.only or list(FAMILIES):
        name = FAMILIES[family]
        figures: dict = result["families"].setdefault(family, {"model": name})
        for stage, measure in (
            (
                "steps",
                functools.partial(step_rows, name, args.tiny, args.steps, device, dtype, peak, args.compiler),
            ),
            ("offload", functools.partial(offload_rows, name, args.tiny, device, dtype)),
        ):
            if budget.left() <= 0:
                figures[stage] = {"status": "skipped", "reason": f"past the --budget of {args.budget:.0f}s"}
            else:
                figures[stage] = measure()
            path = save(output, result, args.results)  # as it goes: a cut-off run keeps what it measured
            print(f"gpu_check: {family} {stage} done ({budget.left():.0f}s of the budget left)", flush=True)
    if not args.only or "cogview4" in args.only:
        result["render_check"] = (
            render_check(args.tiny, device, dtype)
            if budget.left() > 0
            else {"status": "skipped", "reason": f"past the --budget of {args.budget:.0f}s"}
        )
        path = save(output, result, args.results)
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
