"""Compute kernels: a Triton version on CUDA, the torch reference elsewhere (decode
attention: :mod:`gpupool.kernels.decode`, a faster torch version checked against it).

``GPUPOOL_KERNELS=reference`` forces the reference everywhere (read in gpupool.config);
``triton`` forces Triton (on CPU only useful with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from gpupool.kernels import decode, reference
from gpupool.kernels.reference import write_kv

__all__ = [
    "capture_safe",
    "paged_attention_decode",
    "paged_attention_prefill",
    "sgmv_expand",
    "sgmv_shrink",
    "triton_available",
    "write_kv",
]

_MODE = {"kernels": "auto"}


def set_kernel_mode(mode: str) -> None:
    """``auto`` (Triton on CUDA tensors), ``reference`` or ``triton``."""
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"kernel mode must be auto, reference or triton, not {mode!r}")
    _MODE["kernels"] = mode


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def capture_safe() -> bool:
    """Whether a CUDA step's kernels read nothing back to the host, so the step can be
    captured in a CUDA graph: Triton's attention does; the reference reads the longest
    context as a Python int."""
    return _MODE["kernels"] != "reference" and triton_available()


def _use_triton(t: torch.Tensor) -> bool:
    mode = _MODE["kernels"]
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return t.is_cuda and triton_available()


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                           max_len: int | None = None, min_len: int | None = None):
    """See :func:`gpupool.kernels.reference.paged_attention_decode`. ``max_len`` and
    ``min_len``: the longest and shortest of ``context_lens`` if the caller knows them (the
    torch versions then never read them back from the tensor)."""
    if _use_triton(q):
        from gpupool.kernels.paged_attention import paged_attention_decode as impl

        return impl(q, k_cache, v_cache, block_tables, context_lens, scale)
    if _MODE["kernels"] != "reference" and decode.faster_than_reference(q):
        impl = decode.paged_attention_decode
    else:
        impl = reference.paged_attention_decode
    return impl(q, k_cache, v_cache, block_tables, context_lens, scale, max_len, min_len)


def paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """See :func:`gpupool.kernels.reference.paged_attention_prefill`."""
    if _use_triton(q):
        from gpupool.kernels.paged_attention import paged_attention_prefill as impl
    else:
        impl = reference.paged_attention_prefill
    return impl(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def sgmv_shrink(x, w, seg_starts, seg_slots, seg_rows):
    """See :func:`gpupool.kernels.reference.sgmv_shrink`."""
    if _use_triton(x):
        from gpupool.kernels.sgmv import sgmv_shrink as impl
    else:
        impl = reference.sgmv_shrink
    return impl(x, w, seg_starts, seg_slots, seg_rows)


def sgmv_expand(y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets):
    """See :func:`gpupool.kernels.reference.sgmv_expand` (adds into y in place)."""
    if _use_triton(y):
        from gpupool.kernels.sgmv import sgmv_expand as impl
    else:
        impl = reference.sgmv_expand
    impl(y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets)
