"""`--quantize` (the transformer) and `--quantize-text-encoder`: torchao's quantization, applied
on each worker to the loaded weights (`torchao.quantization.quantize_`), before any offloading or
compiling.

- `int8`: int8 weights, one scale per output channel (`Int8WeightOnlyConfig`): half a bf16
  model's weight bytes, activations in the model's dtype;
- `int8-dynamic`: int8 weights and activations, the activations' scales computed per call
  (`Int8DynamicActivationInt8WeightConfig`): int8 matmuls;
- `fp8`: float8 (e4m3) weights and activations, per row (`Float8DynamicActivationFloat8WeightConfig`),
  for GPUs of compute capability 8.9 or more (Ada, Hopper, Blackwell);
- `bnb-8bit`: bitsandbytes' LLM.int8() layers (`Linear8bitLt`, outlier threshold 6.0), as the
  CogVideoX model cards load them with `BitsAndBytesConfig(load_in_8bit=True)`; the weights are
  quantized as a layer moves to the worker's device, and cannot move after, so no --offload.

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
BNB_8BIT = "bnb-8bit"
QUANTIZE_MODES = (NONE, INT8, INT8_DYNAMIC, FP8, BNB_8BIT)
FP8_CAPABILITY = (8, 9)


def check_quantize(transformer: str, text_encoder: str, offload: str | None) -> None:
    for flag, mode in (("--quantize", transformer), ("--quantize-text-encoder", text_encoder)):
        if mode not in QUANTIZE_MODES:
            raise UsageError(f"{flag} {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
        if mode == BNB_8BIT and offload not in (None, NONE):
            raise UsageError(
                f"{flag} bnb-8bit with --offload {offload}: bitsandbytes' 8-bit weights cannot move off "
                "the device they were quantized on; use --quantize int8 to offload quantized weights"
            )


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
    for name, mode in (("transformer", transformer), ("text_encoder", text_encoder)):
        module = getattr(pipe, name, None)
        if mode == NONE or module is None:
            continue
        if mode == BNB_8BIT:
            bnb_8bit(module, device)
        else:
            from torchao.quantization import quantize_

            quantize_(module, torchao_config(mode, device))


def bnb_8bit(module, device) -> None:
    """Every `nn.Linear` of `module` as bitsandbytes' `Linear8bitLt` holding its weights, quantized
    on `device` (the layers that `BitsAndBytesConfig(load_in_8bit=True)` loaders make)."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UsageError(
            f"--quantize bnb-8bit needs bitsandbytes on every worker ({e}): pip install 'cogdist[quantize]'"
        ) from e
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear8bitLt(
                child.in_features, child.out_features, bias=child.bias is not None, has_fp16_weights=False
            )
            layer.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = child.bias
            setattr(parent, name, layer.to(device))


def weight_bytes(module) -> int:
    """Bytes of a module's parameters and buffers; a quantized tensor counts its inner data and
    scales (torchao's tensor subclasses flatten into them)."""
    return sum(_tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def _tensor_bytes(tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
