"""Weight-only int8 matmul in Triton: ``y = (x @ q.T) * scale + bias``.

x: [M, K] (fp16, bf16 or fp32), q: [N, K] int8 (one row per output channel, a view into a
model's flat buffer), scale: [N] and bias: [N] in x's dtype. Same semantics as
:func:`gpupool.kernels.linear.linear_int8_reference`.

A program computes one [BLOCK_M, BLOCK_N] tile of y. It streams its int8 weight tile from
memory once, converts it to x's dtype in registers (exact: every int8 value is representable
in fp16, bf16 and fp32) and accumulates ``x @ q.T`` in fp32; the per-channel scale and the
bias are applied once, on the accumulator. So the weight bytes read are half bf16's, which is
what a decode step (a few rows of x) is bound by. fp32 activations use IEEE products (no
TF32), so the kernel agrees with the reference to rounding.

Under ``TRITON_INTERPRET=1`` (the tests on CPU) ``tl.dot`` on bf16 is wrong; tests there use
fp32 and fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_kernel(
    X, Q, S, B, Y, M, N, K,
    sx_m, sq_n, sy_m,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        xt = tl.load(X + m[:, None].to(tl.int64) * sx_m + k[None, :],
                     mask=mmask[:, None] & kmask[None, :], other=0.0)
        qt = tl.load(Q + n[:, None].to(tl.int64) * sq_n + k[None, :],
                     mask=nmask[:, None] & kmask[None, :], other=0)
        w = qt.to(xt.dtype)
        if IEEE:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w))
    s = tl.load(S + n, mask=nmask, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(B + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None].to(tl.int64) * sy_m + n[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the number of rows: decode batches get short,
    wide-K tiles so that many programs stream the weight; prefill gets square tiles."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 64, 64, 64, 4
    return 128, 128, 64, 8


def rows_and_output(x: torch.Tensor, k: int, n: int):
    """(x as rows [M, k] with a unit last stride, the output [M, n] to fill, x's leading
    shape): what a weight-only kernel's wrapper starts from."""
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device), x.shape[:-1]


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if q.dim() != 2 or q.dtype != torch.int8 or q.stride(-1) != 1:
        raise ValueError("q must be an int8 [N, K] matrix with a contiguous last axis")
    n, k = q.shape
    if x.shape[-1] != k or scale.shape != (n,):
        raise ValueError(f"x [..., {k}] and scale [{n}] expected for q {tuple(q.shape)}")
    x2, y, lead = rows_and_output(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return y.view(*lead, n)
    bm, bn, bk, warps = _tiles(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_kernel[grid](
        x2, q, scale, bias if bias is not None else scale, y, m, n, k,
        x2.stride(0), q.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    return y.view(*lead, n)
