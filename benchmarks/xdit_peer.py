"""xDiT's xfuser as a peer: seconds per denoising step of CogVideoX-5b text-to-video at 49x720x480
through `xFuserCogVideoXPipeline`, on the same real-size random-weight pipeline as step_time.py.

    pip install -e '.[xdit]'                                   # on a machine with CUDA GPUs
    torchrun --nproc_per_node=1 -m benchmarks.xdit_peer        # one GPU: xfuser runs the stock pipeline
    torchrun --nproc_per_node=2 -m benchmarks.xdit_peer --ulysses-degree 2
    torchrun --nproc_per_node=2 -m benchmarks.xdit_peer --cfg-parallel
    torchrun --nproc_per_node=4 -m benchmarks.xdit_peer --ulysses-degree 2 --cfg-parallel [--compile]

The world size must equal ulysses x ring x (2 with --cfg-parallel). Every rank builds the
transformer, VAE and scheduler from tests/data/checkpoints/THUDM__CogVideoX-5b with the same seed
(so the ranks hold the same random bf16 weights) and a one-layer text encoder stand-in, then hands
the pipeline to xfuser, which parallelises the transformer (Ulysses/ring attention, CFG split).
Steps are timed with `callback_on_step_end` (device synchronised); a one-step warm-up call comes
first (it pays torch.compile with --compile). The last rank appends its row to
benchmarks/results/xdit_peer.json (a row with the same parallel settings is replaced).

xfuser imports only where a GPU is present (it raises NotImplementedError on a CPU-only machine),
so this script cannot be smoke-tested on a CPU: it stops with a message saying why.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, save

MODEL = "cogvideox-5b"
WIDTH, HEIGHT, FRAMES, GUIDANCE = 720, 480, 49, 6.0
PROMPT = "a red fox running through snow"


def require_xfuser():
    """xfuser's CogVideoX pipeline and its helpers, or a clear reason to stop."""
    if importlib.util.find_spec("xfuser") is None:
        raise SystemExit(
            "xfuser is not installed: `pip install -e '.[xdit]'` on a machine with CUDA GPUs "
            "(xfuser does not import on a CPU-only machine)"
        )
    if not torch.cuda.is_available():
        raise SystemExit("xdit_peer needs CUDA GPUs: xfuser refuses to import without an accelerator")
    try:
        from xfuser import xFuserArgs, xFuserCogVideoXPipeline
        from xfuser.core.distributed import get_runtime_state, get_world_group
    except Exception as error:  # xfuser raises more than ImportError (NotImplementedError, ...)
        raise SystemExit(
            f"xfuser is installed but does not import here: {type(error).__name__}: {error}"
        ) from error
    return xFuserArgs, xFuserCogVideoXPipeline, get_runtime_state, get_world_group


def record(row: dict) -> Path:
    """Add `row` to xdit_peer.json, replacing the row of the same parallel settings."""
    settings = ("ulysses_degree", "ring_degree", "cfg_parallel", "world_size", "compile", "attention_backend")
    path = RESULTS / "xdit_peer.json"
    rows = json.loads(path.read_text())["results"] if path.exists() else []
    rows = [old for old in rows if any(old.get(k) != row[k] for k in settings)] + [row]
    return save("xdit_peer", {"model": MODEL, "dtype": "torch.bfloat16", "results": rows})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--cfg-parallel", action="store_true", help="the two CFG halves on two ranks")
    parser.add_argument("--compile", action="store_true", help="xfuser's use_torch_compile")
    parser.add_argument(
        "--attention-backend", default=None, help="xfuser's own attention backend (default: its choice)"
    )
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    xFuserArgs, xFuserCogVideoXPipeline, get_runtime_state, get_world_group = require_xfuser()
    if "RANK" not in os.environ:  # plain `python`, not torchrun: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
    world_size = int(os.environ["WORLD_SIZE"])
    wanted = args.ulysses_degree * args.ring_degree * (2 if args.cfg_parallel else 1)
    if wanted != world_size:
        raise SystemExit(
            f"ulysses {args.ulysses_degree} x ring {args.ring_degree} x cfg "
            f"{2 if args.cfg_parallel else 1} = {wanted} ranks, but torchrun started {world_size}"
        )

    from benchmarks.step_time import real_size_pipeline

    engine_args = xFuserArgs(
        model=MODEL,  # only a name: the pipeline is built here, not loaded
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        use_cfg_parallel=args.cfg_parallel,
        use_torch_compile=args.compile,
        attention_backend=args.attention_backend,
        warmup_steps=0,  # PipeFusion's synchronous steps: not used here
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        prompt=PROMPT,
    )
    engine_config, _ = engine_args.create_config()  # initialises torch.distributed from torchrun's env
    engine_config.runtime_config.dtype = torch.bfloat16
    world = get_world_group()
    device = torch.device(f"cuda:{world.local_rank}")
    torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same random weights on every rank
    pipe = xFuserCogVideoXPipeline(real_size_pipeline(MODEL, device, torch.bfloat16), engine_config)

    stamps: list[float] = []

    def stamp(pipeline, step, timestep, callback_kwargs):
        torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return callback_kwargs

    def call(steps: int) -> None:
        pipe(
            prompt=PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator(device="cuda").manual_seed(1),
            output_type="latent",  # the steps are what is compared; the VAE is not
            callback_on_step_end=stamp,
        )

    start = time.perf_counter()
    call(1)
    torch.cuda.synchronize(device)
    warmup_seconds = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats(device)
    stamps.clear()
    call(args.steps)
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first interval is warm-up too

    if world.rank == world.world_size - 1:
        row = {
            "model": MODEL,
            "shape": {"width": WIDTH, "height": HEIGHT, "frames": FRAMES, "cfg": True},
            "peer": "xfuser",
            "xfuser_version": importlib.metadata.version("xfuser"),
            "world_size": world.world_size,
            "ulysses_degree": args.ulysses_degree,
            "ring_degree": args.ring_degree,
            "cfg_parallel": args.cfg_parallel,
            "compile": args.compile,
            "attention_backend": args.attention_backend,
            "warmup_seconds": round(warmup_seconds, 3),
            "steps_timed": len(step_seconds),
            "seconds_per_step": round(statistics.median(step_seconds), 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        }
        print(json.dumps(row), flush=True)
        print(f"saved {record(row)}")
    get_runtime_state().destroy_distributed_env()


if __name__ == "__main__":
    main()
