"""4-bit weight-only matmul in Triton: ``y = x @ W.T + bias`` for the format of
:mod:`gpupool.kernels.quant4` (packed values, float32 scale and offset per group).

A program computes one [BLOCK_M, BLOCK_N] tile of y. Per block of 32 columns it loads its
weight rows' 16 packed bytes once, splits them into the low nibbles (columns 0-15 of the
block) and the high ones (16-31), widens each to float32 as ``q * scale + offset`` (q's
codebook value for q, where the weight has one) with the
block's group's scale and offset, and accumulates ``x @ w.T`` for both halves in float32;
the tile is rounded to x's dtype once, then the bias added. So the weight bytes read are a
quarter of bf16's (plus 8 bytes a group), which a decode step is bound by. Each output's sum
runs over the blocks in order whatever the number of rows (one order a tile shape: the tile
shape follows the row count, as in ``kernels.int8``; the CPU's native product is the
batch-invariant one). fp32 activations use IEEE products (no TF32).

Under ``TRITON_INTERPRET=1`` (the tests on CPU) ``tl.dot`` on bf16 is wrong; tests there use
fp32 and fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpupool.kernels.int8 import rows_and_output


@triton.jit
def weight_block(Q, S, O, C, n, nmask, k0, NG, G, sq_n,
                 HAS_CODE: tl.constexpr, HAS_OFFSET: tl.constexpr, E8: tl.constexpr):
    """Rows ``n`` of a 4-bit weight's block of 32 columns from ``k0`` as float32: (columns
    0-15, columns 16-31), each ``q * scale + offset`` (q's codebook value where there is
    one) with the block's group's scale and offset. Also ``kernels.moe``'s."""
    g = k0 // G
    if E8:  # MXFP4's exponent bytes: 2^(e - 127) (e 0: the subnormal 2^-127)
        e = tl.load(S + n.to(tl.int64) * NG + g, mask=nmask, other=127).to(tl.int32)
        s = tl.where(e > 0, e << 23, 0x00400000).to(tl.float32, bitcast=True)
    else:
        s = tl.load(S + n.to(tl.int64) * NG + g, mask=nmask, other=0.0)
    if HAS_OFFSET:
        o = tl.load(O + n.to(tl.int64) * NG + g, mask=nmask, other=0.0)
    else:  # a codebook weight's: zero
        o = tl.zeros(s.shape, dtype=tl.float32)
    j = tl.arange(0, 16)
    b = tl.load(Q + n[:, None].to(tl.int64) * sq_n + (k0 // 2) + j[None, :],
                mask=nmask[:, None], other=0).to(tl.int32)
    if HAS_CODE:  # a codebook's values, rounded to bf16 (quant4.codebook)
        w_lo = tl.load(C + (b & 15)).to(tl.bfloat16).to(tl.float32) * s[:, None] + o[:, None]
        w_hi = tl.load(C + (b >> 4)).to(tl.bfloat16).to(tl.float32) * s[:, None] + o[:, None]
    else:
        w_lo = (b & 15).to(tl.float32) * s[:, None] + o[:, None]
        w_hi = (b >> 4).to(tl.float32) * s[:, None] + o[:, None]
    return w_lo, w_hi


@triton.jit
def block_product(acc, x_lo, x_hi, w_lo, w_hi, IEEE: tl.constexpr):
    """``acc`` plus the block's x halves times its weight halves (``weight_block``'s):
    float32 IEEE products, or 16-bit activations with the weights rounded to them for the
    tensor cores."""
    if IEEE:
        acc += tl.dot(x_lo.to(tl.float32), tl.trans(w_lo), input_precision="ieee")
        acc += tl.dot(x_hi.to(tl.float32), tl.trans(w_hi), input_precision="ieee")
    else:
        acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)))
        acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)))
    return acc


@triton.jit
def _int4_kernel(
    X, Q, S, O, C, B, Y, M, N, K, NG, G,
    sx_m, sq_n, sy_m,
    HAS_BIAS: tl.constexpr, HAS_CODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
    E8: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, 32):
        w_lo, w_hi = weight_block(Q, S, O, C, n, nmask, k0, NG, G, sq_n,
                                  HAS_CODE, HAS_OFFSET, E8)
        x_lo = tl.load(X + m[:, None].to(tl.int64) * sx_m + k0 + j[None, :],
                       mask=mmask[:, None], other=0.0)
        x_hi = tl.load(X + m[:, None].to(tl.int64) * sx_m + k0 + 16 + j[None, :],
                       mask=mmask[:, None], other=0.0)
        acc = block_product(acc, x_lo, x_hi, w_lo, w_hi, IEEE)
    y = acc.to(Y.dtype.element_ty)
    if HAS_BIAS:
        y = (y.to(tl.float32) + tl.load(B + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
             ).to(Y.dtype.element_ty)
    tl.store(Y + m[:, None].to(tl.int64) * sy_m + n[None, :], y,
             mask=mmask[:, None] & nmask[None, :])


def _tiles(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) by the number of rows."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return 64, 64, 4
    return 128, 64, 8


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor | None,
                bias: torch.Tensor | None = None, code: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``quant4.linear_int4_reference`` (its ``code``: a codebook's 16 values, or None)."""
    if q.dim() != 2 or q.dtype != torch.uint8 or q.stride(-1) != 1:
        raise ValueError("q must be a uint8 [N, K / 2] matrix with a contiguous last axis")
    n, k = q.shape[0], 2 * q.shape[1]
    ng = scale.shape[1] if scale.dim() == 2 else 0
    if (x.shape[-1] != k or k % 32 or not ng or k % ng or (k // ng) % 32
            or scale.shape != (n, ng) or (offset is not None and offset.shape != (n, ng))):
        raise ValueError(f"x [..., {k}], scale and offset [{n}, groups] expected for q "
                         f"{tuple(q.shape)}")
    x2, y, lead = rows_and_output(x, k, n)
    m = x2.shape[0]
    if m == 0:
        return y.view(*lead, n)
    bm, bn, warps = _tiles(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int4_kernel[grid](
        x2, q, scale.contiguous(), scale if offset is None else offset.contiguous(),
        scale if code is None else code.contiguous(),
        bias if bias is not None else scale,
        y, m, n, k, ng, k // ng, x2.stride(0), q.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, HAS_CODE=code is not None, HAS_OFFSET=offset is not None,
        E8=scale.dtype == torch.uint8, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
    )
    return y.view(*lead, n)
