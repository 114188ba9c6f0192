"""Seconds per denoising step and model FLOP utilisation: cogdist's render path against the stock
diffusers pipeline, on real-size architectures with random weights (no download).

    python benchmarks/step_time.py [--models cogvideox-5b glm-image cogview4-6b] [--steps 6]
    python benchmarks/step_time.py --tiny      # the same code on the tiny presets, on a CPU

Each model's transformer and VAE are built from the real checkpoint's configs
(tests/data/checkpoints) with random bf16 weights directly on the GPU. The text encoders are
replaced by one-layer stand-ins of the right output width: they run once per row, outside the
denoising loop that is measured. Every scheduler step is timed (device synchronised), so a step
is one transformer call per CFG half plus the scheduler update; the first steps are discarded as
warm-up. FLOPs per step come from torch's FlopCounterMode over one step's transformer calls;
utilisation is against the bf16 matmul peak measured on the same GPU. Results go to
benchmarks/results/step_time.json (step_time_tiny.json with --tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402
from cogdist.models.registry import PRESETS  # noqa: E402
from cogdist.work import WorkItem  # noqa: E402
from cogdist.worker.inputs import Inputs  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "checkpoints"

# name -> (family, checkpoint folder, tiny preset, row width, height, frames, guidance)
MODELS = {
    "cogvideox-5b": ("cogvideox", "THUDM__CogVideoX-5b", "tiny-cogvideox", 720, 480, 49, 6.0),
    "glm-image": ("glm_image", "zai-org__GLM-Image", "tiny-glm-image", 1024, 1024, None, 1.5),
    "cogview4-6b": ("cogview4", "THUDM__CogView4-6B", "tiny-cogview4", 1024, 1024, None, 3.5),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the ceiling utilisation is set against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, reps = time.perf_counter(), 20 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def real_size_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    """The real transformer, VAE and scheduler from the checkpoint's configs, random weights, and a
    one-layer text encoder of the real output width (it runs once per row, outside the steps)."""
    import diffusers
    from transformers import ByT5Tokenizer, GlmConfig, GlmModel, T5Config, T5EncoderModel

    from cogdist.models.tiny import tiny_tokenizer
    from cogdist.worker.worker import WorkerSettings, place

    family, folder = MODELS[name][0], CHECKPOINTS / MODELS[name][1]
    index = json.loads((folder / "model_index.json").read_text())

    def component(sub: str):
        cls = getattr(diffusers, index[sub][1])
        config_file = "scheduler_config.json" if sub == "scheduler" else "config.json"
        config = json.loads((folder / sub / config_file).read_text())
        if sub == "scheduler":
            return cls.from_config(config)
        with torch.device(device):  # build on the GPU: a 6 B model initialises in seconds
            return cls.from_config(config).to(dtype).eval()

    components = {sub: component(sub) for sub in ("transformer", "vae", "scheduler")}
    width = components["transformer"].config.text_embed_dim
    tokenizer = ByT5Tokenizer() if family == "glm_image" else tiny_tokenizer()
    with torch.device(device):
        if family == "cogview4":
            text_encoder = GlmModel(
                GlmConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=width,
                    intermediate_size=256,
                    num_hidden_layers=1,
                    num_attention_heads=32,
                    num_key_value_heads=2,
                    head_dim=width // 32,
                    pad_token_id=0,
                )
            )
        else:
            text_encoder = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=4
                )
            )
    if family == "glm_image":  # the decoder alone, from prior tokens: the 9 B AR stage is not timed
        components.update(processor=None, vision_language_encoder=None)
    pipe = getattr(diffusers, index["_class_name"])(
        tokenizer=tokenizer, text_encoder=text_encoder.to(dtype).eval(), **components
    )
    spec = PRESETS[folder.name.replace("__", "/")]
    return place(pipe, device, WorkerSettings(vae_tiling=spec.vae_tiling, vae_slicing=spec.vae_slicing))


def tiny_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    from cogdist.models import family_module
    from cogdist.worker.worker import WorkerSettings, place

    spec = PRESETS[MODELS[name][2]]
    pipe = family_module(spec.family).load_pipeline(spec, dtype)
    return place(pipe, device, WorkerSettings(vae_tiling=spec.vae_tiling, vae_slicing=spec.vae_slicing))


class StepClock:
    """Times every scheduler step of a pipeline (device synchronised) and counts a step's FLOPs."""

    def __init__(self, pipe, device: torch.device):
        self.device, self.stamps = device, []
        original = pipe.scheduler.step

        def timed_step(*args, **kwargs):
            result = original(*args, **kwargs)
            synchronize(device)
            self.stamps.append(time.perf_counter())
            return result

        pipe.scheduler.step = timed_step

    def step_seconds(self, warmup: int = 1) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])][warmup:]


def transformer_flops(pipe, call) -> int:
    """FLOPs of the transformer's forward calls during `call()` (text encoders and VAE excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    total, original = 0, pipe.transformer.forward

    def counted(*args, **kwargs):
        nonlocal total
        counter = FlopCounterMode(display=False)
        with counter:
            result = original(*args, **kwargs)
        total += counter.get_total_flops()
        return result

    pipe.transformer.forward = counted
    try:
        call()
    finally:
        pipe.transformer.forward = original
    return total


def run(name: str, tiny: bool, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    from cogdist.models import family_module

    family, _, preset, width, height, frames, guidance = MODELS[name]
    if tiny:
        spec = PRESETS[preset]
        width, height, frames = spec.width, spec.height, spec.num_frames
        pipe = tiny_pipeline(name, device, dtype)
    else:
        pipe = real_size_pipeline(name, device, dtype)
    module = family_module(family)
    task = "text-to-video" if frames else "text-to-image"
    item = WorkItem(
        "bench",
        "a red fox running through snow",
        None,
        1,
        width,
        height,
        steps,
        guidance,
        frames,
        "o",
        task=task,
    )

    extra: dict = {}
    priors = None
    if family == "glm_image":  # random prior tokens stand in for the AR stage's
        from cogdist.models.glm_image import PriorTokens

        codebook = pipe.transformer.config.prior_vq_quantizer_codebook_size
        tokens = torch.randint(
            0, codebook, (1, 4 * (height // 32) * (width // 32)), generator=torch.Generator().manual_seed(0)
        )
        priors = [PriorTokens(tokens)]
        extra["prior_token_ids"] = tokens.to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(pipe, device)
    if priors is not None:
        module.render(pipe, [item], device, [Inputs()], priors=priors)
    else:
        module.render(pipe, [item], device, [Inputs()])
    cogdist_steps = clock.step_seconds()

    clock.stamps = []
    kwargs = dict(
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        **extra,
    )
    if frames:
        kwargs["num_frames"] = frames
    pipe(prompt=item.prompt, generator=torch.Generator("cpu").manual_seed(1), **kwargs)
    stock_steps = clock.step_seconds()

    # FLOPs of one step: the transformer calls (both CFG halves) of a one-step render.
    flops = transformer_flops(
        pipe,
        lambda: pipe(prompt=item.prompt, **{**kwargs, "num_inference_steps": 1, "output_type": "latent"}),
    )
    peak = matmul_peak(device, dtype)
    cogdist_median, stock_median = statistics.median(cogdist_steps), statistics.median(stock_steps)
    return {
        "model": name if not tiny else f"{name} (tiny preset)",
        "shape": {"width": width, "height": height, "frames": frames, "cfg": guidance > 1},
        "steps_timed": len(cogdist_steps),
        "cogdist_seconds_per_step": round(cogdist_median, 4),
        "stock_seconds_per_step": round(stock_median, 4),
        "cogdist_vs_stock": round(cogdist_median / stock_median, 3),
        "tflops_per_step": round(flops / 1e12, 6),
        "matmul_peak_tflops": round(peak / 1e12, 1),
        "mfu_cogdist": round(flops / cogdist_median / peak, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["cogvideox-5b"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="the tiny presets on whatever device is here")
    args = parser.parse_args()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("real-size architectures need a GPU; run with --tiny to check the script on a CPU")
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    results = []
    for name in args.models:
        results.append(run(name, args.tiny, args.steps, device, dtype))
        print(json.dumps(results[-1]), flush=True)
    print(
        f"saved {save('step_time_tiny' if args.tiny else 'step_time', {'dtype': str(dtype), 'results': results})}"
    )


if __name__ == "__main__":
    main()
