"""Attention through diffusers' dispatcher: the stock processors routed, a backend set and checked.

Some stock processors (CogView4's, CogVideoX's) call `F.scaled_dot_product_attention` themselves,
so neither an attention backend (`set_attention_backend`) nor context parallelism reaches them.
`dispatched` redirects that one call of such a processor to `dispatch_attention_fn`; processors
that already dispatch (GLM-Image's) need nothing. Sequence parallelism (`cogdist.parallel.sequence`)
and `--attention-backend` both route this way. The default backend, "native", routes nothing: a
render then runs exactly the stock code.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import types
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn

from cogdist.errors import UsageError
from cogdist.models.registry import sequence_plan
from cogdist.worker.attention import AUTO, AUTO_ORDER, CONTEXT_PARALLEL, NATIVE

_active: contextvars.ContextVar = contextvars.ContextVar("cogdist_attention", default=None)
"""The dispatched processor running now, if any."""


def dispatched(processor):
    """`processor` with its scaled-dot-product call going through diffusers' dispatcher.

    A subclass rather than a wrapper: `Attention` filters its keyword arguments by the
    processor's `__call__` signature, which the subclass keeps.
    """
    base = type(processor)

    @functools.wraps(base.__call__)
    def __call__(self, attn, *args, **kwargs):
        token = _active.set(self)
        try:
            return base.__call__(self, attn, *args, **kwargs)
        finally:
            _active.reset(token)

    cls = type(
        f"Dispatched{base.__name__}",
        (base,),
        {
            "__call__": __call__,
            "_attention_backend": None,
            "_parallel_config": None,
        },  # set by set_attention_backend and enable_parallelism
    )
    routed = cls.__new__(cls)
    routed.__dict__.update(processor.__dict__)
    return routed


def _scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw
):
    active = _active.get()
    if active is None:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **kw,
        )
    if attn_mask is not None and active._parallel_config is not None:
        raise ValueError("sequence parallelism takes no attention mask: encode prompts one row at a time")
    # SDPA's layout is (batch, heads, tokens, dim); the dispatcher's is (batch, tokens, heads, dim).
    out = dispatch_attention_fn(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        backend=active._attention_backend,
        parallel_config=active._parallel_config,
    )
    return out.transpose(1, 2)


class _Functional(types.ModuleType):
    """`torch.nn.functional` with `scaled_dot_product_attention` routed through the dispatcher
    while a `dispatched` processor runs (and untouched otherwise)."""

    def __getattr__(self, name):
        return getattr(F, name)


_ROUTED = _Functional("torch.nn.functional")
_ROUTED.scaled_dot_product_attention = _scaled_dot_product_attention


def route_sdpa_through_dispatcher(modules: Iterable[str]) -> None:
    """Make the attention processors of these Python modules (dotted names) call the dispatcher
    while a `dispatched` processor runs; `F.scaled_dot_product_attention` otherwise. Idempotent."""
    for name in modules:
        importlib.import_module(name).F = _ROUTED


def route_through_dispatcher(transformer: torch.nn.Module) -> dict:
    """Route every processor of `transformer` that does not dispatch through diffusers'
    dispatcher (the modules its family's plan names). Returns {module: its processor before}."""
    replaced = {}
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not hasattr(processor, "_attention_backend"):
            replaced[module] = processor
            module.processor = dispatched(processor)
    route_sdpa_through_dispatcher(sequence_plan(type(transformer).__name__).dispatch)
    return replaced


def apply_attention_backend(transformer: torch.nn.Module, backend: str, sp: int = 1) -> str:
    """Run `transformer`'s attention with diffusers' `backend`, checked first on the model's own
    device and dtype: a backend this worker cannot run (its package missing, a device or dtype it
    does not take) raises UsageError with diffusers' reason. "native" changes nothing; "auto" is
    the first of AUTO_ORDER that runs here (with context parallelism under `sp` > 1). Returns the
    backend applied."""
    parameter = next(transformer.parameters())
    if backend == AUTO:
        backend = first_that_runs(parameter.device, parameter.dtype, sp)  # checked there
    elif backend != NATIVE:
        if sp > 1 and parameter.device.type != "cuda":
            # Its context-parallel kernel is a CUDA op (e.g. aten::_scaled_dot_product_flash_attention),
            # which the one-process probe below does not reach.
            raise UsageError(
                f"--attention-backend {backend} under --sp {sp} needs a GPU: diffusers' context-parallel "
                f"kernels of the backends other than native are CUDA ops (this worker has {parameter.device})"
            )
        check_backend_runs(backend, parameter.device, parameter.dtype)
    if backend == NATIVE:
        return backend
    route_through_dispatcher(transformer)
    # diffusers' own setter: it refuses a backend without context parallelism under --sp.
    transformer.set_attention_backend(backend)
    return backend


def first_that_runs(device: torch.device, dtype: torch.dtype, sp: int = 1) -> str:
    """The first backend of AUTO_ORDER this worker can run (native runs everywhere)."""
    for candidate in AUTO_ORDER:
        if sp > 1 and candidate not in CONTEXT_PARALLEL:
            continue
        try:
            check_backend_runs(candidate, device, dtype)
        except UsageError:
            continue
        return candidate
    return NATIVE


def check_backend_runs(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """One small attention call with `backend` on `device` in `dtype`, through diffusers' own
    requirement and constraint checks; UsageError naming the backend and the reason if it fails."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _check_attention_backend_requirements,
    )

    where = f"{device.type}, {str(dtype).removeprefix('torch.')}"
    try:
        name = AttentionBackendName(backend)
        _check_attention_backend_requirements(name)
        query = torch.randn(1, 64, 2, 64, device=device, dtype=dtype)
        kwargs = {"query": query, "key": query, "value": query, "attn_mask": None, "dropout_p": 0.0}
        kwargs.update({"is_causal": False, "scale": None})
        for check in _AttentionBackendRegistry._constraints.get(name, ()):
            check(**kwargs)
        dispatch_attention_fn(query, query, query, backend=name)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"--attention-backend {backend} cannot run on this worker ({where}): {reason}"
        ) from e
