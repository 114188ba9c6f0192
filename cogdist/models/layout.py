"""Whether a model can take a gang layout: checked before any gang starts, with the reason.

A rule of the model and the options (heads, image tokens), read from its family's spec."""

from __future__ import annotations

import math

from cogdist.errors import UsageError
from cogdist.models.registry import family
from cogdist.models.spec import TOKEN_PIXELS, ModelSpec


def image_tokens(width: int, height: int, token_pixels: int = TOKEN_PIXELS) -> int:
    """Image tokens of a width x height output, at `token_pixels` pixels per token side."""
    return (width // token_pixels) * (height // token_pixels)


def heads_split(heads: int, sp: int) -> bool:
    """Whether Ulysses can split `heads` over `sp` ranks: evenly, or in the uneven mode, which pads
    the heads up to a multiple of sp and allows less padding than one rank's share."""
    return heads % sp == 0 or sp - heads % sp < math.ceil(heads / sp)


def check_layout(spec: ModelSpec, sp: int, cfg_parallel: bool, gpus_per_node: float = 0.0) -> None:
    """Raise UsageError when `spec` cannot be split `sp` ways (x2 with CFG parallelism)."""
    if sp < 1:
        raise UsageError(f"--sp must be at least 1, got {sp}")
    size = sp * (2 if cfg_parallel else 1)
    if gpus_per_node and size > gpus_per_node:
        raise UsageError(
            f"--sp {sp}{' with --cfg-parallel' if cfg_parallel else ''} needs {size} GPUs in one node "
            f"(a gang shares NVLink/PCIe); the largest node has {gpus_per_node:g}"
        )
    if sp == 1:
        return
    heads = spec.heads
    if heads:
        if sp > heads:
            raise UsageError(
                f"--sp {sp}: {spec.name} has {heads} attention heads; Ulysses splits heads, so --sp <= {heads}"
            )
        if not heads_split(heads, sp):
            allowed = [k for k in range(2, heads + 1) if heads_split(heads, k)]
            raise UsageError(
                f"--sp {sp}: {spec.name}'s {heads} attention heads do not split {sp} ways "
                f"(would pad {sp - heads % sp} heads onto shares of {math.ceil(heads / sp)}); "
                f"try --sp in {allowed[:8]}"
            )
    rule = spec.sizes
    width, height = min(rule.only) if rule.only else (rule.min_side, rule.min_side)
    tokens = image_tokens(width, height, family(spec.family).token_pixels)
    if tokens < sp:
        raise UsageError(
            f"--sp {sp}: a {width}x{height} {spec.kind} of {spec.name} has only {tokens} image tokens to split"
        )
