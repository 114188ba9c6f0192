"""Apply a gang's parallelism to a whole pipeline: one call, composed from the plain functions."""

from __future__ import annotations

import torch.distributed as dist
from diffusers import DiffusionPipeline

from cogdist.parallel.cfg import apply_cfg_parallel
from cogdist.parallel.group import GangGroup
from cogdist.parallel.sequence import apply_sequence_parallel
from cogdist.parallel.vae import apply_distributed_vae_decode


def parallelize(pipe: DiffusionPipeline, gang: GangGroup, cfg_mode: str) -> None:
    """Sequence parallelism inside each CFG half, CFG parallelism across the halves (the family's
    `cfg_mode`), and, when the VAE tiles, its tiles decoded across the whole gang."""
    if gang.world_size == 1:
        return
    # The uneven mode: prompts and sizes vary from row to row, and with them the token counts.
    apply_sequence_parallel(pipe.transformer, gang, uneven=True)
    apply_cfg_parallel(pipe.transformer, gang, cfg_mode)
    if getattr(pipe.vae, "use_tiling", False):
        apply_distributed_vae_decode(pipe.vae, dist.group.WORLD)
