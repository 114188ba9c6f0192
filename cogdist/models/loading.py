"""Loading real checkpoints the same way for every family."""

from __future__ import annotations

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline


def from_pretrained(
    pipeline_class: type[DiffusionPipeline], source: str, dtype: torch.dtype
) -> DiffusionPipeline:
    """`pipeline_class.from_pretrained` from safetensors only (a pickle checkpoint can run code when
    it is loaded), with CPU weights moved to fresh storage.

    Weights loaded from safetensors sit at unaligned offsets of the file buffer, where the CPU GEMM
    kernels round a last bit differently; a fresh allocation (one tensor at a time, so the peak is one
    tensor's size) makes a loaded pipeline compute exactly what the same weights built in memory do.
    On a GPU the move to the device re-allocates anyway.
    """
    pipe = pipeline_class.from_pretrained(source, dtype=dtype, use_safetensors=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    return pipe
