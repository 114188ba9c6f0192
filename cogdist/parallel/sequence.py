"""Sequence parallelism: one sample's tokens split over the ranks of a CFG half.

This is diffusers' own context parallelism (`enable_parallelism` with a `ContextParallelConfig`),
given what diffusers 0.42 lacks for these models:
- a `cp_plan` per transformer, which each family declares as plain data (`SequencePlan` in its
  FamilySpec): split the text and image/video tokens as they enter the first block, split the
  rotary tables the same way, gather the tokens after `proj_out` (before unpatchifying). Joint
  text+image attention stays exact: Ulysses' all-to-all hands every rank the whole sequence (in
  rank order) for its heads, and unmasked attention does not depend on key order.
- attention routed through `dispatch_attention_fn` (`cogdist.parallel.attention`): some stock
  processors (the Python modules a plan's `dispatch` lists) call `F.scaled_dot_product_attention`
  themselves, so a plan alone would attend within each rank's shard only and be silently wrong.
- a mesh resolved without `torch.accelerator.device_count()` (zero on a CPU, where diffusers
  would divide by it).
Where the head count or the token count does not divide by the degree, the uneven mode
("Ulysses anything") pads nothing and splits unevenly. Ring attention needs an attention backend
that returns the log-sum-exp (flash, cuDNN), which a CPU does not have; it is offered on GPU only.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook, context_parallel
from diffusers.models._modeling_parallel import (
    ContextParallelConfig,
    ContextParallelInput,
    ContextParallelOutput,
    ParallelConfig,
    gather_size_by_comm,
)

from cogdist.models.registry import sequence_plan
from cogdist.models.spec import Gather, SequencePlan, Split
from cogdist.parallel.attention import route_through_dispatcher
from cogdist.parallel.group import GangGroup


class TextOnFirstRank(ModelHook):
    """Give the first block's text tokens to the first rank of the group and none to the others.

    Every rank must bring a disjoint part of the sequence to the all-to-all; the uneven mode
    accepts an empty text part.
    """

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def pre_forward(self, module, *args, **kwargs):
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = self._part(kwargs["encoder_hidden_states"])
        else:
            args = (args[0], self._part(args[1]), *args[2:])
        return args, kwargs

    def _part(self, text: torch.Tensor) -> torch.Tensor:
        return text if self.rank == 0 else text[:, :0]


def _padded_all_gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """diffusers' uneven gather, for gloo: its `all_gather` takes equal sizes only, so pad to the
    largest shard, gather, and cut each shard back to its own size."""
    sizes = gather_size_by_comm(tensor.shape[dim], group)
    largest = max(sizes)
    padding = [0, 0] * (tensor.dim() - dim - 1) + [0, largest - tensor.shape[dim]]
    padded = F.pad(tensor.contiguous(), padding)
    shards = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(shards, padded, group=group)
    return torch.cat([shard.narrow(dim, 0, size) for shard, size in zip(shards, sizes)], dim=dim)


def _diffusers_plan_entry(entry):
    """A spec's plain-data plan entry as diffusers' ContextParallelInput/Output objects."""
    if isinstance(entry, Split):
        return ContextParallelInput(
            split_dim=entry.split_dim, expected_dims=entry.expected_dims, split_output=entry.split_output
        )
    if isinstance(entry, Gather):
        return ContextParallelOutput(gather_dim=entry.gather_dim, expected_dims=entry.expected_dims)
    if isinstance(entry, (list, tuple)):
        return [_diffusers_plan_entry(e) for e in entry]
    return {key: _diffusers_plan_entry(value) for key, value in entry.items()}


def diffusers_cp_plan(plan: SequencePlan) -> dict:
    """`plan.modules` as diffusers' ContextParallelModelPlan."""
    return {path: _diffusers_plan_entry(entry) for path, entry in plan.modules.items()}


def context_parallel_config(gang: GangGroup, uneven: bool) -> ContextParallelConfig:
    # The whole ("cfg", "ring", "ulysses") mesh: diffusers takes the ("ring", "ulysses") slice of
    # this rank's CFG half from it.
    return ContextParallelConfig(ulysses_degree=gang.layout.sp, ulysses_anything=uneven, mesh=gang.mesh)


def apply_sequence_parallel(transformer: torch.nn.Module, gang: GangGroup, uneven: bool = False) -> None:
    """Split `transformer`'s tokens over the ranks of this rank's CFG half (Ulysses attention).

    `uneven`: split unevenly where heads or tokens do not divide by the degree.
    """
    if gang.layout.sp == 1:
        return
    # diffusers 0.42 gathers with funcol.all_gather_tensor, deprecated in torch 2.13: one warning
    # per call and rank in the driver's log, about code cogdist does not own.
    warnings.filterwarnings("ignore", message=".*all_gather_tensor.* is deprecated", category=FutureWarning)
    plan = sequence_plan(type(transformer).__name__)
    route_through_dispatcher(transformer)
    if uneven and gang.device.type == "cpu":
        context_parallel._all_gather_anything = _padded_all_gather
    config = ParallelConfig(context_parallel_config=context_parallel_config(gang, uneven))

    def resolve(_config) -> ParallelConfig:
        # diffusers' resolver picks the device as rank % accelerator count, which is 0 on a CPU.
        config.setup(gang.rank, gang.world_size, gang.device, mesh=gang.mesh)
        transformer._parallel_config = config
        return config

    transformer._resolve_parallel_config = resolve
    transformer.enable_parallelism(config=config, cp_plan=diffusers_cp_plan(plan))
    if plan.text_on_first_rank:
        if not uneven:
            raise ValueError(f"{type(transformer).__name__} needs the uneven mode for sequence parallelism")
        sp_rank = gang.rank % gang.layout.sp
        block = transformer.get_submodule(plan.text_on_first_rank)
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(TextOnFirstRank(sp_rank), "cogdist_text_on_first_rank")


def context_parallel_attention_eager() -> None:
    """Run diffusers' context-parallel attention outside compiled graphs (--compile under --sp).

    Its uneven all-to-all ("Ulysses anything") asks the peers for their sizes inside the call,
    which dynamo cannot trace; the rest of each block still compiles, around it.
    """
    from diffusers.models import attention_dispatch

    attention = attention_dispatch._templated_context_parallel_attention
    if not getattr(attention, "_cogdist_eager", False):
        eager = torch.compiler.disable(attention)
        eager._cogdist_eager = True
        attention_dispatch._templated_context_parallel_attention = eager
