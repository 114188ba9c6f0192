"""`--attention-backend`: the names the driver checks, as plain data (the driver imports no torch).

The torch side, routing the stock processors through diffusers' dispatcher and checking that a
worker can run the backend, is `cogdist.parallel.attention`. tests/test_attention_backend.py
checks these names against diffusers' `AttentionBackendName` and its registry.
"""

from __future__ import annotations

from cogdist.errors import UsageError

NATIVE = "native"
"""torch's scaled_dot_product_attention, called as the stock processors call it: the default."""
AUTO = "auto"
"""The first of AUTO_ORDER a worker can run, chosen once per job (the job's first worker)."""
AUTO_ORDER = ("_flash_3", "_native_cudnn", "flash", NATIVE)
"""Exact backends, fastest first on Hopper-class GPUs: FlashAttention 3, cuDNN's fused attention
(which torch's own SDPA ranks last), FlashAttention 2, then torch's default choice. On a CPU only
native runs in float32."""

BACKENDS = (
    "flash",
    "flash_hub",
    "flash_varlen",
    "flash_varlen_hub",
    "flash_4_hub",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "aiter_fa2_hub",
    "flex",
    NATIVE,
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "_native_npu",
    "_native_xla",
    "sage",
    "sage_hub",
    "sage_blackwell_hub",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
)
"""diffusers 0.42's AttentionBackendName values."""

CONTEXT_PARALLEL = frozenset(
    {
        "_flash_3_hub",
        "_flash_3_varlen_hub",
        "_native_cudnn",
        "_native_flash",
        "_native_npu",
        "flash",
        "flash_hub",
        "flash_varlen_hub",
        NATIVE,
        "sage",
        "sage_hub",
    }
)
"""The backends diffusers registers with context-parallel support: the ones --sp takes."""


def check_attention_backend(backend: str, sp: int) -> None:
    """Refuse a name diffusers does not know, and under --sp a backend without context parallelism."""
    if backend == AUTO:
        return
    if backend not in BACKENDS:
        raise UsageError(f"--attention-backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if sp > 1 and backend not in CONTEXT_PARALLEL:
        raise UsageError(
            f"--attention-backend {backend} does not support context parallelism, which --sp {sp} "
            f"uses; choose one of {', '.join(sorted(CONTEXT_PARALLEL))}"
        )
