"""Stages that run once per sample on the gang's first rank, their results handed to the others.

Text encoding and GLM-Image's autoregressive prior are sequential and small next to denoising:
running them on every rank would waste K-1 GPUs' time, and the AR stage would not even agree
with itself across ranks (it samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from cogdist.parallel.group import GangGroup

T = TypeVar("T")


def on_first_rank(gang: GangGroup | None, stage: Callable[[], T]) -> T:
    """`stage()` run on rank 0 alone; every rank returns its result (tensors on its own device)."""
    if gang is None or gang.world_size == 1:
        return stage()
    result = stage() if gang.rank == 0 else None
    # Pickled CPU copies: the results are prompt embeddings and token ids, kilobytes to a few MB.
    box = [tree_map(_to_cpu, result)]
    dist.broadcast_object_list(box, src=0, device=gang.device if gang.device.type == "cuda" else None)
    return result if gang.rank == 0 else tree_map(lambda x: _to(x, gang.device), box[0])


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def drop_first_rank_models(pipe, gang: GangGroup | None, names: tuple[str, ...]) -> None:
    """On every rank but the first, remove the models only first-rank stages use (CogView4's
    9B GLM text encoder, GLM-Image's 9B AR model, CogVideoX's T5), before they reach a GPU."""
    if gang is None or gang.is_writer:
        return
    pipe.register_modules(**dict.fromkeys(names))


def failed_on_any_rank(gang: GangGroup, failed: list[bool]) -> list[bool]:
    """Per row: did it fail on any rank of the gang? (One small all-reduce.)"""
    flags = torch.tensor(failed, dtype=torch.uint8, device=gang.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(flag) for flag in flags.tolist()]
