"""Step caching (`--cache`): diffusers' cache hooks on a pipeline's transformer, opt-in.

A denoising step changes the transformer's inputs little from the step before, so some of its
work can be reused instead of computed. Three of diffusers' (0.42) cache hooks, on the transformer
only; the stock pipeline still runs the loop:
- `first-block` (First Block Cache): every call runs the first block; when its residual differs
  from the one of the last full call by less than `threshold` (mean |difference| / mean |residual|),
  the other blocks are skipped and their last residual is added instead;
- `taylorseer` (TaylorSeer): after TAYLORSEER_WARMUP full steps, each block computes every
  TAYLORSEER_INTERVAL-th step only; in between, its output is extrapolated (first order) from
  its last two computations;
- `pab` (Pyramid Attention Broadcast): self-attention outputs are reused every other step while the
  timestep lies in PAB_TIMESTEPS.
Each changes pixels, so it is a job setting (a resume with another one is refused).

Which kinds work with which family, and why not the others, each family declares in its
FamilySpec (`step_caches`, `no_step_cache`), checked on diffusers 0.42.1 (tests/test_step_cache.py).

first-block decides from the mean over everything one transformer call holds, so a row's output
would depend on its batch-mates (--batch-size > 1), and ranks holding different shards (--sp) or
CFG halves (--cfg-parallel) could decide differently (a 2-rank CogView4 gang hung): it is refused
there. taylorseer and pab decide by the step alone and compute per element, so they compose with
batches and gangs (SP=2 equals one rank within 1/255). A step checkpoint does not hold the cache's
state, so a resumed item would restart it and differ from an uninterrupted one (taylorseer: by a
lot): with a cache, step checkpoints are off (RenderOptions).

This module is imported by the driver (`check_step_cache`); torch is imported lazily.
"""

from __future__ import annotations

import math
from typing import Any

from cogdist.errors import UsageError
from cogdist.models.registry import family as family_spec
from cogdist.models.spec import CACHE_KINDS, FIRST_BLOCK, NO_CACHE, PAB, TAYLORSEER

__all__ = [
    "CACHE_KINDS",
    "FIRST_BLOCK",
    "FIRST_BLOCK_THRESHOLD",
    "NO_CACHE",
    "PAB",
    "TAYLORSEER",
    "apply_step_cache",
    "check_step_cache",
    "remove_step_cache",
    "reset_step_cache",
]

FIRST_BLOCK_THRESHOLD = 0.1
"""Default relative change of the first block's residual below which the other blocks are skipped
(diffusers' default is 0.05, its CogView4 example uses 0.2; higher skips more)."""
TAYLORSEER_INTERVAL = 5
TAYLORSEER_WARMUP = 3
"""diffusers' defaults: steps 0-2 in full, then one full step in every 5."""
PAB_SKIP_RANGE = 2
PAB_TIMESTEPS = (100, 800)
"""diffusers' CogVideoX example: every other self-attention reused for timesteps in (100, 800)."""


def check_step_cache(
    family: str,
    model: str,
    kind: str,
    threshold: float | None,
    *,
    gang_size: int = 1,
    batch_size: int = 1,
) -> None:
    """Raise UsageError when `kind` cannot be used with this model (of the `family` key) and layout."""
    if kind not in CACHE_KINDS:
        raise UsageError(f"--cache {kind!r}: choose one of {', '.join(CACHE_KINDS)}")
    if threshold is not None:
        if kind != FIRST_BLOCK:
            raise UsageError("--cache-threshold applies to --cache first-block only")
        if not 0 < threshold < math.inf:
            raise UsageError(f"--cache-threshold must be a finite number > 0, got {threshold}")
    if kind == NO_CACHE:
        return
    spec = family_spec(family)
    if kind not in spec.step_caches:
        usable = [k for k in spec.step_caches if k != kind]
        reason = spec.no_step_cache.get(kind, f"no step cache is known to work with the {family} family")
        hint = f"; use --cache {' or '.join(usable)}" if usable else "; it takes no --cache"
        raise UsageError(f"--cache {kind}: not with {model}: {reason}{hint}")
    if kind == FIRST_BLOCK and (gang_size > 1 or batch_size > 1):
        raise UsageError(
            "--cache first-block decides from the mean over a whole transformer call: with "
            "--batch-size > 1 a row's output would depend on its batch-mates, and the ranks of a "
            "gang (--sp, --cfg-parallel) could decide differently. Use --cache taylorseer, or "
            "--batch-size 1 without a gang."
        )


def apply_step_cache(pipe: Any, kind: str, threshold: float | None = None) -> None:
    """Enable the `kind` step cache on `pipe.transformer` (nothing for "none").

    Apply it before any parallelism (cogdist.parallel.pipeline.parallelize), so that the hooks see
    the tokens of their own rank.
    """
    if kind == NO_CACHE:
        return
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    transformer = pipe.transformer
    if kind == FIRST_BLOCK:
        config: Any = FirstBlockCacheConfig(
            threshold=FIRST_BLOCK_THRESHOLD if threshold is None else threshold
        )
    elif kind == TAYLORSEER:
        config = TaylorSeerCacheConfig(
            cache_interval=TAYLORSEER_INTERVAL,
            disable_cache_before_step=TAYLORSEER_WARMUP,
            max_order=1,
            taylor_factors_dtype=transformer.dtype,
            # Whole blocks: the default patterns name no module of these transformers.
            cache_identifiers=[r"transformer_blocks\.\d+"],
        )
    elif kind == PAB:
        timestep = _TimestepOfLastCall()
        # The timestep of the transformer's own call: the stock pipelines' `current_timestep` is
        # set on the pipeline object that runs, which for another task is not `pipe`.
        timestep.handle = transformer.register_forward_pre_hook(timestep, with_kwargs=True)
        transformer._cogdist_timestep = timestep
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=PAB_SKIP_RANGE,
            spatial_attention_timestep_skip_range=PAB_TIMESTEPS,
            current_timestep_callback=timestep.value,
        )
    else:
        raise ValueError(f"unknown step cache {kind!r}")
    transformer.enable_cache(config)


def reset_step_cache(pipe: Any) -> None:
    """Forget what the cache holds, before a pipeline call: a call that failed midway leaves its
    state behind (the stock pipelines reset it only when a call finishes)."""
    transformer = pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()


def remove_step_cache(pipe: Any) -> None:
    """Remove the hooks of `apply_step_cache`: the transformer computes every step again."""
    transformer = pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    timestep = vars(transformer).pop("_cogdist_timestep", None)
    if timestep is not None:
        timestep.handle.remove()


class _TimestepOfLastCall:
    """A forward pre-hook that remembers the `timestep` argument of the transformer's last call."""

    def __init__(self) -> None:
        self.timestep: float | None = None
        self.handle: Any = None

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep")
        if timestep is not None:
            self.timestep = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)

    def value(self) -> float:
        if self.timestep is None:
            raise RuntimeError("PAB asked for the timestep before the transformer was called")
        return self.timestep
