"""Seconds per denoising step and model FLOP utilisation: cogdist's render path against the stock
diffusers pipeline, on real-size architectures with random weights (no download).

    python -m benchmarks.step_time [--models cogvideox-5b glm-image cogview4-6b] [--steps 6]
        [--attention-backends native,_native_cudnn,...] [--sdpa-routing stock,dispatcher]
        [--compile] [--output NAME]
    python -m benchmarks.step_time --tiny      # the same code on the tiny presets, on a CPU

One row per (model, path, SDPA routing, attention backend, compile on/off); path is cogdist's
render or the stock pipeline call, both on the same loaded pipeline. The attention backend is
set with diffusers' `set_attention_backend`, which only processors that call diffusers'
`dispatch_attention_fn` honour: GLM-Image's do; the stock CogVideoX and CogView4 processors call
`F.scaled_dot_product_attention` themselves, in both paths (cogdist routes them through the
dispatcher only under sequence parallelism). `--sdpa-routing dispatcher` routes them as cogdist's
sequence parallelism does, so that the backend reaches them; `backend_calls_per_step` counts the
attention calls that reached the chosen backend. A backend that cannot run on this device is a
"skipped" row with the reason. `--compile` adds rows with the transformer's repeated blocks
compiled, as cogdist's `--compile` does (cogdist.worker.compile); a 2-step warm-up render
precedes each measured one, and `compile_seconds` is the compiled
warm-up less the uncompiled one (inductor's on-disk cache can make a repeat compile cheap).

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
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.common import family_runner, save, set_up_worker
from cogdist.inputs import Inputs
from cogdist.models.registry import PRESETS
from cogdist.work import WorkItem
from cogdist.worker.compile import compile_transformer, repeated_blocks
from cogdist.worker.quantize import NONE as NO_QUANTIZATION
from cogdist.worker.quantize import quantize_pipeline

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
    from cogdist.worker.offload import place
    from cogdist.worker.settings import WorkerSettings

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
    """The tiny preset's pipeline of model `name`, built by a worker set up in this process (which
    places it on this machine's device: `device` must be of that type)."""
    worker = set_up_worker(MODELS[name][2], dtype=str(dtype).removeprefix("torch."))
    if worker.device.type != device.type:
        raise ValueError(f"a worker here renders on {worker.device}, not {device}")
    return worker.pipe


def pipeline(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """Model `name`'s pipeline: its tiny preset's, or the real-size one with random weights."""
    return tiny_pipeline(name, device, dtype) if tiny else real_size_pipeline(name, device, dtype)


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


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why diffusers' attention backend `name` cannot run here, or None when it can.

    The requirement check is the one `set_attention_backend` makes (packages, versions); a small
    attention call then catches what it does not check (a CUDA-only kernel on a CPU, a missing
    hub kernel, a dtype the kernel refuses)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    try:
        backend = AttentionBackendName(name)
    except ValueError:
        return (
            f"not a diffusers attention backend (known: {', '.join(b.value for b in AttentionBackendName)})"
        )
    try:
        _check_attention_backend_requirements(backend)
        query = torch.randn(1, 128, 2, 64, device=device, dtype=dtype)  # (batch, tokens, heads, dim)
        dispatch_attention_fn(query, query, query, backend=backend)
        synchronize(device)  # a CUDA kernel's failure surfaces here, not in a later row
    except Exception as error:  # any failure means "not on this device": recorded, not raised
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    return None


@contextlib.contextmanager
def backend_call_counter(name: str) -> Iterator[list[int]]:
    """Count the calls that reach backend `name`'s kernel through diffusers' dispatcher.

    Whether a backend setting changes anything depends on the attention processor: only those
    that call `dispatch_attention_fn` honour it, and the count shows which paths do."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    key, calls = AttentionBackendName(name), [0]
    original = _AttentionBackendRegistry._backends[key]

    def counted(**kwargs):
        calls[0] += 1
        return original(**kwargs)

    _AttentionBackendRegistry._backends[key] = counted
    try:
        yield calls
    finally:
        _AttentionBackendRegistry._backends[key] = original


def route_through_dispatcher(transformer: torch.nn.Module) -> dict:
    """Route the stock CogVideoX/CogView4 processors' `F.scaled_dot_product_attention` through
    diffusers' dispatcher, as cogdist does for `--attention-backend` and under sequence
    parallelism, so that a backend setting reaches them. Returns the replaced processors, for
    `restore_processors`."""
    from cogdist.parallel.attention import route_through_dispatcher as route

    return route(transformer)


def restore_processors(replaced: dict) -> None:
    for module, processor in replaced.items():
        module.processor = processor


def render_cogdist(pipe, runner, item: WorkItem, device: torch.device, priors) -> None:
    if priors is not None:  # GLM-Image's render given the prior tokens skips the AR stage
        from cogdist.models.glm_image.runner import render

        render(pipe, [item], device, [Inputs()], priors=priors)
    else:
        runner.render(pipe, [item], device, [Inputs()])


def timed_path(render, clock: StepClock, backend: str, count_calls: bool) -> dict:
    """One path's figures: a 2-step warm-up render (which pays any compilation), then the
    measured render."""
    clock.stamps = []
    start = time.perf_counter()
    if count_calls:  # uncompiled only: a counter inside a compiled graph would be traced away
        with backend_call_counter(backend) as calls:
            render(WARMUP_STEPS)
    else:
        calls = None
        render(WARMUP_STEPS)
    warmup_seconds = time.perf_counter() - start
    clock.stamps = []
    render(None)
    step_seconds = clock.step_seconds()
    return {
        "warmup_seconds": round(warmup_seconds, 3),
        "backend_calls_per_step": None if calls is None else round(calls[0] / WARMUP_STEPS, 1),
        "steps_timed": len(step_seconds),
        "seconds_per_step": round(statistics.median(step_seconds), 4),
    }


WARMUP_STEPS = 2
PATHS = ("cogdist", "stock")


def run(
    name: str,
    tiny: bool,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    backends: list[str],
    compile_modes: list[bool],
    routings: list[str],
    peak: float,
    quantize: str = NO_QUANTIZATION,
    paths: tuple[str, ...] = PATHS,
    compile_backend: str = "inductor",
) -> list[dict]:
    """One row per (path, routing, backend, compile) for model `name`, its transformer quantized
    by `quantize` (cogdist.worker.quantize; a mode this device cannot run raises UsageError)."""
    family, _, preset, width, height, frames, guidance = MODELS[name]
    if tiny:
        spec = PRESETS[preset]
        width, height, frames = spec.width, spec.height, spec.num_frames
    pipe = pipeline(name, tiny, device, dtype)
    if quantize != NO_QUANTIZATION:
        quantize_pipeline(pipe, device, quantize, NO_QUANTIZATION)
    runner = family_runner(family)
    task = "text-to-video" if frames else "text-to-image"

    def work_item(item_steps: int) -> WorkItem:
        prompt = "a red fox running through snow"
        return WorkItem("bench", prompt, None, 1, width, height, item_steps, guidance, frames, "o", task=task)

    extra: dict = {}
    priors = None
    if family == "glm_image":  # random prior tokens stand in for the AR stage's
        from cogdist.models.glm_image.runner import PriorTokens

        codebook = pipe.transformer.config.prior_vq_quantizer_codebook_size
        tokens = torch.randint(
            0, codebook, (1, 4 * (height // 32) * (width // 32)), generator=torch.Generator().manual_seed(0)
        )
        priors = [PriorTokens(tokens)]
        extra["prior_token_ids"] = tokens.to(device)
    kwargs = dict(height=height, width=width, guidance_scale=guidance, output_type="np", **extra)
    if frames:
        kwargs["num_frames"] = frames

    def render(path: str, render_steps: int | None) -> None:
        render_steps = render_steps or steps
        if path == "cogdist":
            render_cogdist(pipe, runner, work_item(render_steps), device, priors)
        else:
            pipe(
                prompt=work_item(render_steps).prompt,
                generator=torch.Generator("cpu").manual_seed(1),
                num_inference_steps=render_steps,
                **kwargs,
            )

    # FLOPs of one step: the transformer calls (both CFG halves) of a one-step render, with the
    # stock processors, uncompiled. Neither the backend nor compilation changes the count.
    flops = transformer_flops(
        pipe,
        lambda: pipe(prompt="a red fox", **{**kwargs, "num_inference_steps": 1, "output_type": "latent"}),
    )
    # One untimed render per path first: the process's first render pays one-time costs (lazy
    # imports, kernel and allocator warm-up, the VAE's first decode) that would otherwise land in
    # the first row's warm-up and in its compile_seconds.
    for path in paths:
        render(path, 1)
    clock = StepClock(pipe, device)
    transformer = pipe.transformer
    shape = {"width": width, "height": height, "frames": frames, "cfg": guidance > 1}
    rows: list[dict] = []
    for routing in routings:
        replaced = route_through_dispatcher(transformer) if routing == "dispatcher" else {}
        for backend in backends:
            unavailable = backend_unavailable(backend, device, dtype)
            if unavailable is None:
                try:
                    transformer.set_attention_backend(backend)
                except Exception as error:  # e.g. a hub kernel it cannot download here
                    unavailable = f"{type(error).__name__}: {error}"[:300]
            for compiled in compile_modes:
                uncompile(transformer)
                if compiled and unavailable is None:
                    torch._dynamo.reset()  # each compiled row pays (and reports) its own compile
                    compile_transformer(transformer, compile_backend)  # what --compile does
                for path in paths:
                    row = {
                        "model": name if not tiny else f"{name} (tiny preset)",
                        "shape": shape,
                        "path": path,
                        "sdpa_routing": routing,
                        "backend": backend,
                        "compile": compiled,
                        "quantize": quantize,
                    }
                    if unavailable is not None:
                        rows.append({**row, "status": "skipped", "reason": unavailable})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        figures = timed_path(
                            functools.partial(render, path),
                            clock,
                            backend,
                            count_calls=not compiled,
                        )
                    except Exception as error:  # e.g. a backend refusing a real shape: a row, not a crash
                        message = str(error).splitlines()[0] if str(error) else ""
                        rows.append(
                            {**row, "status": "failed", "reason": f"{type(error).__name__}: {message}"}
                        )
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    rows.append(
                        {
                            **row,
                            "status": "ok",
                            **figures,
                            "tflops_per_step": round(flops / 1e12, 6),
                            "mfu": round(flops / figures["seconds_per_step"] / peak, 4),
                            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda"
                            else None,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            uncompile(transformer)
        restore_processors(replaced)
    transformer.set_attention_backend("native")
    return relate(rows)


def uncompile(transformer: torch.nn.Module) -> None:
    """Undo `compile_transformer`: the blocks run eagerly again."""
    for block in repeated_blocks(transformer):
        block._compiled_call_impl = None


def relate(rows: list[dict]) -> list[dict]:
    """Add the figures that compare rows: cogdist against stock on the same settings, and the
    compile time (the compiled cogdist row's warm-up less the uncompiled one's: cogdist runs
    first after compiling, so it pays the compile; the stock row's warm-up shows any recompile).

    The calls that reach the backend do not depend on compilation: a compiled row takes its
    uncompiled twin's count."""

    def key(row: dict, **change) -> tuple:
        row = {**row, **change}
        quantized = row.get("quantize", NO_QUANTIZATION)
        return row["model"], row["path"], row["sdpa_routing"], row["backend"], row["compile"], quantized

    ok = {key(row): row for row in rows if row["status"] == "ok"}
    for row in ok.values():
        stock = ok.get(key(row, path="stock"))
        if row["path"] == "cogdist" and stock is not None:
            row["cogdist_vs_stock"] = round(row["seconds_per_step"] / stock["seconds_per_step"], 3)
        eager = ok.get(key(row, compile=False))
        if row["compile"] and eager is not None:
            row["backend_calls_per_step"] = eager["backend_calls_per_step"]
            if row["path"] == PATHS[0]:  # the first path run pays the compile; the second reuses it
                row["compile_seconds"] = round(row["warmup_seconds"] - eager["warmup_seconds"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["cogvideox-5b"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="the tiny presets on whatever device is here")
    parser.add_argument(
        "--attention-backends",
        default="native",
        help="comma-separated diffusers attention backends (diffusers' AttentionBackendName values, "
        "e.g. native,_native_cudnn,_native_efficient,_native_flash,flash,sage); one that cannot "
        "run here is recorded as skipped",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every setting with the transformer's repeated blocks compiled (--compile)",
    )
    parser.add_argument(
        "--sdpa-routing",
        default="stock",
        help="comma-separated: 'stock' (the processors as diffusers ships them: CogVideoX's and "
        "CogView4's call F.scaled_dot_product_attention and ignore the backend) and/or "
        "'dispatcher' (route them through diffusers' dispatcher, as cogdist does under "
        "sequence parallelism)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="results file name under benchmarks/results (default: step_time, or step_time_tiny with --tiny)",
    )
    args = parser.parse_args()
    backends = [name.strip() for name in args.attention_backends.split(",") if name.strip()]
    routings = [name.strip() for name in args.sdpa_routing.split(",") if name.strip()]
    if not set(routings) <= {"stock", "dispatcher"}:
        parser.error("--sdpa-routing takes 'stock' and/or 'dispatcher'")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("real-size architectures need a GPU; run with --tiny to check the script on a CPU")
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    peak = matmul_peak(device, dtype)
    results = []
    for name in args.models:
        results.extend(
            run(
                name,
                args.tiny,
                args.steps,
                device,
                dtype,
                backends,
                [False, True] if args.compile else [False],
                routings,
                peak,
            )
        )
    summary = {
        "dtype": str(dtype),
        "matmul_peak_tflops": round(peak / 1e12, 3),
        "warmup_steps": WARMUP_STEPS,
        "attention_backends": backends,
        "sdpa_routings": routings,
        "compile": args.compile,
        "results": results,
    }
    output = args.output or ("step_time_tiny" if args.tiny else "step_time")
    print(f"saved {save(output, summary)}")


if __name__ == "__main__":
    main()
