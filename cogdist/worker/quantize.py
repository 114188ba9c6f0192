"""`--quantize` (the transformer) and `--quantize-text-encoder`: torchao's quantization, applied
on each worker to the loaded weights (`torchao.quantization.quantize_`), before any offloading or
compiling.

- `int8`: int8 weights, one scale per output channel (`Int8WeightOnlyConfig`): half a bf16
  model's weight bytes, activations in the model's dtype;
- `int8-dynamic`: int8 weights and activations, the activations' scales computed per call
  (`Int8DynamicActivationInt8WeightConfig`): int8 matmuls;
- `fp8`: float8 (e4m3) weights and activations, per row (`Float8DynamicActivationFloat8WeightConfig`),
  for GPUs of compute capability 8.9 or more (Ada, Hopper, Blackwell).

Each changes pixels (rounded weights), so they are job settings: a resume with another value is
refused. A worker that cannot run a mode (torchao missing, fp8 without such a GPU) stops the job
at setup with exit 2 and the reason. This module is imported by the driver; torch is imported
lazily.
"""

from __future__ import annotations

from cogdist.errors import UsageError

NONE = "none"
INT8 = "int8"
INT8_DYNAMIC = "int8-dynamic"
FP8 = "fp8"
QUANTIZE_MODES = (NONE, INT8, INT8_DYNAMIC, FP8)
FP8_CAPABILITY = (8, 9)


def check_quantize(transformer: str, text_encoder: str) -> None:
    for flag, mode in (("--quantize", transformer), ("--quantize-text-encoder", text_encoder)):
        if mode not in QUANTIZE_MODES:
            raise UsageError(f"{flag} {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")


def torchao_config(mode: str, device):
    """torchao's config for `mode` on `device`; UsageError where this worker cannot run it."""
    import torch

    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as e:
        raise UsageError(
            f"--quantize {mode} needs torchao on every worker ({e}): pip install 'cogdist[quantize]'"
        ) from e
    if mode == INT8:
        return Int8WeightOnlyConfig()
    if mode == INT8_DYNAMIC:
        return Int8DynamicActivationInt8WeightConfig()
    if mode == FP8:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_CAPABILITY:
            has = f"compute capability {capability[0]}.{capability[1]}" if capability else "no CUDA GPU"
            raise UsageError(
                f"--quantize fp8 needs a GPU of compute capability >= 8.9 (float8 matmuls); this "
                f"worker has {has}: use int8 or int8-dynamic"
            )
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"unknown quantization {mode!r}")


def quantize_pipeline(pipe, device, transformer: str, text_encoder: str) -> None:
    """Quantize the pipeline's transformer and text encoder in place, each by its mode."""
    from torchao.quantization import quantize_

    for name, mode in (("transformer", transformer), ("text_encoder", text_encoder)):
        module = getattr(pipe, name, None)
        if mode != NONE and module is not None:
            quantize_(module, torchao_config(mode, device))


def weight_bytes(module) -> int:
    """Bytes of a module's parameters and buffers; a quantized tensor counts its inner data and
    scales (torchao's tensor subclasses flatten into them)."""
    return sum(_tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def _tensor_bytes(tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
