"""SGMV (segmented gather matrix-vector) LoRA kernels in Triton, after Punica.

Rows of a batch are grouped in segments, one adapter (device slot) each. ``sgmv_shrink``
projects each segment's rows to its adapter's rank (x @ A.T); ``sgmv_expand`` adds the rank-r
activations back through B (y += h @ B.T). A program handles one segment and one tile of
output columns, so each adapter's weights are read once per tile and adapters of different
ranks share a batch without padding compute to the largest rank. Same signatures and
semantics as :mod:`gpupool.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    X, W, OUT, STARTS, SLOTS, ROWS, K,
    sx_t, sw_s, sw_r, so_t,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s = tl.program_id(0)
    rb = tl.program_id(1)
    lo = tl.load(STARTS + s)
    hi = tl.load(STARTS + s + 1)
    slot = tl.load(SLOTS + s).to(tl.int64)
    rows = tl.load(ROWS + s)
    if rb * BLOCK_R < rows:
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < rows
        for m0 in range(lo, hi, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            mmask = m < hi
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < K
                xt = tl.load(X + m[:, None] * sx_t + k[None, :],
                             mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                wt = tl.load(W + slot * sw_s + r[:, None] * sw_r + k[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
            tl.store(OUT + m[:, None] * so_t + r[None, :], acc.to(OUT.dtype.element_ty),
                     mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand_kernel(
    Y, H, W, STARTS, SLOTS, RANKS, OFFS, N,
    sy_t, sh_t, sw_s, sw_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    s = tl.program_id(0)
    nb = tl.program_id(1)
    lo = tl.load(STARTS + s)
    hi = tl.load(STARTS + s + 1)
    slot = tl.load(SLOTS + s).to(tl.int64)
    rank = tl.load(RANKS + s)
    off = tl.load(OFFS + s)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    for m0 in range(lo, hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mmask = m < hi
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < rank
            ht = tl.load(H + m[:, None] * sh_t + off + r[None, :],
                         mask=mmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            wt = tl.load(W + slot * sw_s + n[:, None] * sw_n + r[None, :],
                         mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(ht, tl.trans(wt), input_precision="ieee")
        ymask = mmask[:, None] & nmask[None, :]
        yp = Y + m[:, None] * sy_t + n[None, :]
        tl.store(yp, (tl.load(yp, mask=ymask, other=0.0) + acc).to(Y.dtype.element_ty),
                 mask=ymask)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() < 2 or t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last axis")


def sgmv_shrink(x, w, seg_starts, seg_slots, seg_rows):
    _check_rows(x, "x")
    _check_rows(w, "w")
    if w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError("x must be [T, K] and w [num_slots, R, K]")
    out = x.new_zeros(x.shape[0], w.shape[1], dtype=w.dtype)
    num_segs = seg_slots.shape[0]
    if num_segs == 0 or x.shape[0] == 0:
        return out
    grid = (num_segs, triton.cdiv(w.shape[1], 16))
    _shrink_kernel[grid](x, w, out, seg_starts, seg_slots, seg_rows, x.shape[1],
                         x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                         BLOCK_M=16, BLOCK_R=16, BLOCK_K=32)
    return out


def sgmv_expand(y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets):
    _check_rows(y, "y")
    _check_rows(h, "h")
    _check_rows(w, "w")
    if w.dim() != 3 or y.shape[1] != w.shape[1]:
        raise ValueError("y must be [T, N] and w [num_slots, N, R]")
    num_segs = seg_slots.shape[0]
    if num_segs == 0 or y.shape[0] == 0:
        return
    grid = (num_segs, triton.cdiv(y.shape[1], 32))
    _expand_kernel[grid](y, h, w, seg_starts, seg_slots, seg_ranks, seg_h_offsets, y.shape[1],
                         y.stride(0), h.stride(0), w.stride(0), w.stride(1),
                         BLOCK_M=16, BLOCK_N=32, BLOCK_R=16)
