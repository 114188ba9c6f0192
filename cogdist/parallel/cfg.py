"""Classifier-free-guidance parallelism: the conditional pass on one half of the gang, the
unconditional pass on the other, their outputs exchanged, so each step costs one pass.

Two shapes of pipeline loop exist among these models:
- batched (e.g. CogVideoX): one transformer call per step on the batch [uncond; cond]. Each half takes
  its part of every batch-sized input and the outputs are gathered along the batch.
- paired (e.g. CogView4, GLM-Image): two calls per step, conditional first. The family's render arms
  `pairing` with how the unconditional call differs; at the conditional call, the second half
  runs the unconditional one instead, both outputs are exchanged, and the second call of the
  step returns the stored result without computing.
Both are exact: every half computes what one rank would, and the guidance arithmetic stays in
the stock pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from cogdist.models.spec import BATCHED, PAIRED
from cogdist.parallel.group import GangGroup

__all__ = ["BATCHED", "PAIRED", "CfgParallel", "apply_cfg_parallel", "pairing"]


def _never(kwargs: dict) -> bool:
    return False


class CfgParallel:
    """The forward wrapper installed on a transformer by `apply_cfg_parallel`."""

    def __init__(self, forward: Callable, gang: GangGroup, mode: str) -> None:
        self.forward = forward
        self.gang = gang
        self.mode = mode
        self.group = gang.cfg_group()
        self.uncond: Callable[[dict], dict] | None = None
        self.passthrough: Callable[[dict], bool] = _never
        self.stored: tuple | None = None

    def __call__(self, *args, **kwargs):
        if args:
            raise TypeError("CFG parallelism expects the transformer to be called with keywords only")
        if self.mode == BATCHED:
            return self._batched(kwargs)
        if self.uncond is None or self.passthrough(kwargs):
            return self.forward(**kwargs)  # no guidance: both halves compute the same call
        if self.stored is not None:
            stored, self.stored = self.stored, None
            return stored
        if kwargs.get("return_dict", True):
            raise TypeError("paired CFG parallelism expects return_dict=False")
        mine = kwargs if self.gang.cfg_rank == 0 else self.uncond(kwargs)
        cond, uncond = self._gather(self.forward(**mine)[0])
        self.stored = (uncond,)
        return (cond,)

    def _batched(self, kwargs: dict):
        batch = kwargs["hidden_states"].shape[0]
        if batch % 2:  # no guidance in this call
            return self.forward(**kwargs)
        half = self.gang.cfg_rank
        mine = {
            name: value.chunk(2)[half]
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch
            else value
            for name, value in kwargs.items()
        }
        output = self.forward(**mine)
        sample = output[0] if isinstance(output, tuple) else output.sample
        gathered = torch.cat(self._gather(sample))
        return (gathered,) if isinstance(output, tuple) else type(output)(sample=gathered)

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(2)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts


def apply_cfg_parallel(transformer: torch.nn.Module, gang: GangGroup, mode: str) -> CfgParallel | None:
    """Split guidance over the gang's two halves (after any sequence parallelism is applied)."""
    if gang.layout.cfg == 1:
        return None
    if mode not in (BATCHED, PAIRED):
        raise ValueError(f"unknown CFG-parallel mode {mode!r}")
    wrapper = CfgParallel(transformer.forward, gang, mode)
    transformer.forward = wrapper
    return wrapper


@contextlib.contextmanager
def pairing(
    transformer: torch.nn.Module,
    uncond: Callable[[dict], dict],
    passthrough: Callable[[dict], bool] | None = None,
) -> Iterator[None]:
    """Within one pipeline call with guidance: `uncond(kwargs)` turns a conditional call's
    arguments into the unconditional one's; `passthrough(kwargs)` marks calls outside the pairs
    (GLM-Image's KV-cache prefill). A no-op without paired CFG parallelism."""
    wrapper = transformer.forward if isinstance(transformer.forward, CfgParallel) else None
    if wrapper is None or wrapper.mode != PAIRED:
        yield
        return
    wrapper.uncond, wrapper.passthrough, wrapper.stored = uncond, passthrough or _never, None
    try:
        yield
    finally:
        wrapper.uncond, wrapper.passthrough, wrapper.stored = None, _never, None
