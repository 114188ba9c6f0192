"""`--offload`: how much of the pipeline stays on the GPU, through diffusers' offloading.

- `none`: every component on the GPU (fastest; the default);
- `model`: model CPU offload: a component moves to the GPU while it runs (the text encoder, then
  the transformer, then the VAE), so the GPU holds the largest one;
- `group`: group offloading: the weights stay in CPU memory and each layer is copied to the GPU
  just before it runs, the next one's copy overlapping the running one on a CUDA stream; the GPU
  holds a few layers and the activations;
- `sequential`: sequential CPU offload: every layer moved in and out as it runs, without overlap
  (the least memory, the slowest).

Each is a recorded setting (it moves weights, it changes no pixel), applied on GPUs only: on a CPU
the weights are in CPU memory already. `place` puts a pipeline on its device with these and the
VAE's tiling and slicing; the worker's out-of-memory retry (`saving_memory`) turns model offload
on only where no offload is set. This module is imported by the driver
(`check_offload`); torch is imported lazily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cogdist.errors import UsageError
from cogdist.worker.quantize import BNB_8BIT

if TYPE_CHECKING:
    from cogdist.worker.settings import WorkerSettings

NONE = "none"
MODEL = "model"
GROUP = "group"
SEQUENTIAL = "sequential"
OFFLOAD_MODES = (NONE, MODEL, GROUP, SEQUENTIAL)
CPU_OFFLOAD_ALIASES = {"--cpu-offload": MODEL, "--no-cpu-offload": NONE}
"""The flags of earlier versions, kept: `--cpu-offload` is `--offload model`."""


def check_offload(offload: str | None, gang_size: int, compile: bool) -> None:
    """Refuse an unknown mode, and the ones that cannot work with a gang or --compile."""
    if offload is None or offload == NONE:
        return
    if offload not in OFFLOAD_MODES:
        raise UsageError(f"--offload {offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
    if gang_size > 1 and offload != MODEL:
        raise UsageError(
            f"--offload {offload} in a gang of {gang_size} GPUs (--sp/--cfg-parallel): the gang's "
            "parallelism and the per-layer offloading are hooks on the same blocks, which diffusers "
            "does not compose; use --offload model, or more GPUs per gang"
        )
    if compile and offload == SEQUENTIAL:
        raise UsageError(
            "--compile with --offload sequential: moving every layer's weights in hooks breaks each "
            "compiled block apart; use --offload group, which compiles"
        )


def weight_memory(weights: tuple[tuple[str, int], ...], bytes_per_parameter: int = 2) -> str:
    """What the GPU holds of a preset's weights (bf16: 2 bytes a parameter) under each tier, as
    `cogdist models` shows it; "" where the parameters are not known. Activations come on top."""
    if not weights:
        return ""
    total = sum(n for _, n in weights) * bytes_per_parameter / 1e9
    largest, count = max(weights, key=lambda w: w[1])
    return (
        f"GPU memory of the bf16 weights: --offload none {total:.1f} GB, model {count * bytes_per_parameter / 1e9:.1f} GB "
        f"(the {largest.replace('_', ' ')}), group/sequential a few layers; activations on top"
    )


def offload_pipeline(pipe, device, mode: str) -> None:
    """Apply `mode` to `pipe` for the accelerator `device` (a CPU `device` is group offload's
    own onload device: what the tests run)."""
    import torch

    if mode == MODEL:
        pipe.enable_model_cpu_offload(device=device)
    elif mode == SEQUENTIAL:
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == GROUP:
        cuda = device.type == "cuda"
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=cuda,  # the next layer's copy overlaps the running one
            non_blocking=cuda,
        )
    elif mode != NONE:
        raise ValueError(f"unknown offload mode {mode!r}")


@contextlib.contextmanager
def saving_memory(pipe, device, settings: WorkerSettings) -> Iterator[None]:
    """Every memory-saving setting on for the duration; the worker's own settings after."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    # Never a second offload, nor one of bitsandbytes' 8-bit weights (they cannot leave the device).
    quantized_8bit = BNB_8BIT in (settings.quantize, settings.quantize_text_encoder)
    offload = device.type == "cuda" and settings.offload == NONE and not quantized_8bit
    if offload:
        offload_pipeline(pipe, device, MODEL)
    try:
        yield
    finally:
        if offload:
            pipe.remove_all_hooks()
            pipe.to(device)
        if not settings.vae_tiling:
            pipe.vae.disable_tiling()
        if not settings.vae_slicing:
            pipe.vae.disable_slicing()


def place(pipe, device, settings: WorkerSettings):
    """Put a pipeline on its device with the memory options a user of diffusers expects."""
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if device.type == "cuda" and settings.offload != NONE:
        offload_pipeline(pipe, device, settings.offload)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
