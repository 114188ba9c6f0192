"""Loading real checkpoints the same way for every family."""

from __future__ import annotations

import json
import os
import re

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from cogdist.errors import ModelError
from cogdist.models.spec import ModelSpec
from cogdist.models.trust import ALLOW_PICKLE_FLAG, TRUST_CODE_FLAG, check_folder_index, check_index

_COMMIT = re.compile(r"[0-9a-f]{40}")


def from_pretrained(
    pipeline_class: type[DiffusionPipeline], spec: ModelSpec, dtype: torch.dtype
) -> DiffusionPipeline:
    """`pipeline_class.from_pretrained` of `spec.source`, with CPU weights moved to fresh storage.

    Weights load from safetensors only and no code that ships with the checkpoint is imported,
    unless the spec carries the user's opt-ins (`allow_pickle`, `trust_remote_code`): a pickle
    checkpoint can run code when it is loaded. The files are checked here, where they are loaded
    (a Hub checkpoint is fetched at the revision whose model_index.json was checked).

    Weights loaded from safetensors sit at unaligned offsets of the file buffer, where the CPU GEMM
    kernels round a last bit differently; a fresh allocation (one tensor at a time, so the peak is one
    tensor's size) makes a loaded pipeline compute exactly what the same weights built in memory do.
    On a GPU the move to the device re-allocates anyway.
    """
    safe = {"use_safetensors": None if spec.allow_pickle else True}  # None: safetensors, else pickle
    if spec.trust_remote_code:
        safe["trust_remote_code"] = True
    try:
        folder = spec.source if os.path.isdir(spec.source) else _download(pipeline_class, spec, safe)
        check_folder_index(
            spec.name, folder, allow_pickle=spec.allow_pickle, trust_remote_code=spec.trust_remote_code
        )
        pipe = pipeline_class.from_pretrained(folder, dtype=dtype, **safe)
    except (OSError, ValueError) as e:  # diffusers' and huggingface_hub's errors
        raise ModelError(f"cannot load {spec.name}: {type(e).__name__}: {e}{_hint(str(e), spec)}") from e
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    return pipe


def _download(pipeline_class: type[DiffusionPipeline], spec: ModelSpec, safe: dict) -> str:
    """The local snapshot of a Hub checkpoint, fetched once its model_index.json passed the checks:
    `download` would import a custom pipeline class before anything else could be checked."""
    from huggingface_hub import hf_hub_download

    index_file = hf_hub_download(spec.source, "model_index.json")
    with open(index_file) as f:
        check_index(spec.name, json.load(f), trust_remote_code=spec.trust_remote_code)
    commit = os.path.basename(os.path.dirname(index_file))  # .../snapshots/<commit>/model_index.json
    revision = commit if _COMMIT.fullmatch(commit) else None
    return pipeline_class.download(spec.source, revision=revision, **safe)


def _hint(message: str, spec: ModelSpec) -> str:
    if "safetensors" in message and not spec.allow_pickle:
        return f" (weights load from safetensors only; {ALLOW_PICKLE_FLAG} loads pickle weights you trust)"
    if "trust_remote_code" in message and not spec.trust_remote_code:
        return f" (cogdist runs code that ships with a checkpoint only with {TRUST_CODE_FLAG})"
    return ""
