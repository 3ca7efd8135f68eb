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
def _rows_tile(X, sx_t, m, mmask, rows, rmask, K,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's rows ``m`` times the weight rows that start at pointers ``rows`` (K values each):
    a [BLOCK_M, BLOCK_R] float32 tile, K in blocks of BLOCK_K."""
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        xt = tl.load(X + m[:, None] * sx_t + k[None, :],
                     mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(rows[:, None] + k[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
    return acc


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
            acc = _rows_tile(X, sx_t, m, mmask, W + slot * sw_s + r * sw_r, rmask, K,
                             BLOCK_M, BLOCK_R, BLOCK_K)
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


# ---- LoRA terms read in place from the adapters' pages (adapters/paged.py) ----------------
# An adapter's piece l r + k (rank row k of layer l) lies in page PAGE_IDS[SEG_PAGES[s] +
# (l r + k) // PPP] at ((l r + k) % PPP) pieces into it; MEM is the pages' memory as elements
# of the pieces' dtype (PAGE_E elements a page, PIECE_E a piece). A group's A rows start
# A_OFF elements into a piece (projection j's at A_OFF + j K), its BT row at BT_OFF.


@triton.jit
def _piece_base(PAGE_IDS, SEG_PAGES, s, idx, PPP, PAGE_E, PIECE_E):
    """Element offsets of pieces ``idx`` of segment s's adapter."""
    first = tl.load(SEG_PAGES + s)
    page = tl.load(PAGE_IDS + first + idx // PPP).to(tl.int64)
    return page * PAGE_E + (idx % PPP).to(tl.int64) * PIECE_E


@triton.jit
def _paged_shrink_kernel(
    X, MEM, H, STARTS, SEG_RANK, ROWS, SEG_PAGES, PAGE_IDS, K, layer, P, PPP, PAGE_E,
    PIECE_E, A_OFF, sx_t, sh_t,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    s = tl.program_id(0)
    rb = tl.program_id(1)
    lo = tl.load(STARTS + s)
    hi = tl.load(STARTS + s + 1)
    r = tl.load(SEG_RANK + s)
    if tl.load(ROWS + s) > 0 and rb * BLOCK_R < P * r:  # (0: the group is not targeted)
        i = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # h's column: projection i // r, row i % r
        imask = i < P * r
        j = i // tl.maximum(r, 1)
        k = i % tl.maximum(r, 1)
        base = _piece_base(PAGE_IDS, SEG_PAGES, s, tl.where(imask, layer * r + k, 0), PPP,
                           PAGE_E, PIECE_E) + A_OFF + j.to(tl.int64) * K
        for m0 in range(lo, hi, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            mmask = m < hi
            acc = _rows_tile(X, sx_t, m, mmask, MEM + base, imask, K, BLOCK_M, BLOCK_R,
                             BLOCK_K)
            tl.store(H + m[:, None] * sh_t + i[None, :], acc,
                     mask=mmask[:, None] & imask[None, :])


@triton.jit
def _paged_expand_kernel(
    Y, H, MEM, STARTS, SEG_RANK, SEG_PAGES, PAGE_IDS, PROJ_RANK, COLS, S, layer, PPP, PAGE_E,
    PIECE_E, BT_OFF, N, sy_t, sh_t,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    s = tl.program_id(0)
    nb = tl.program_id(1)
    lo = tl.load(STARTS + s)
    hi = tl.load(STARTS + s + 1)
    r = tl.load(SEG_RANK + s)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    if r > 0:
        for m0 in range(lo, hi, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            mmask = m < hi
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(P):  # the columns of projection j: [COLS_j, COLS_j+1)
                c_lo = tl.load(COLS + j)
                c_hi = tl.load(COLS + j + 1)
                rj = tl.load(PROJ_RANK + j * S + s)
                jmask = nmask & (n >= c_lo) & (n < c_hi)
                for r0 in range(0, rj, BLOCK_R):
                    k = r0 + tl.arange(0, BLOCK_R)
                    kmask = k < rj
                    ht = tl.load(H + m[:, None] * sh_t + j * r + k[None, :],
                                 mask=mmask[:, None] & kmask[None, :], other=0.0)
                    base = _piece_base(PAGE_IDS, SEG_PAGES, s, tl.where(kmask, layer * r + k, 0),
                                       PPP, PAGE_E, PIECE_E) + BT_OFF
                    bt = tl.load(MEM + base[:, None] + n[None, :],
                                 mask=kmask[:, None] & jmask[None, :], other=0.0).to(tl.float32)
                    acc += tl.dot(ht, bt, input_precision="ieee")
            ymask = mmask[:, None] & nmask[None, :]
            yp = Y + m[:, None] * sy_t + n[None, :]
            tl.store(yp, (tl.load(yp, mask=ymask, other=0.0) + acc).to(Y.dtype.element_ty),
                     mask=ymask)


def lora_paged(x, out, mem, starts, seg_rank, group_rows, seg_pages, page_ids, proj_rank,
               layer: int, pieces_per_page: int, piece_elems: int, a_off: int, bt_off: int,
               cols, max_rank: int) -> None:
    """``out[:, projection j's columns] += (x A_s^T)_j B_{s,j}^T`` per segment s for one
    projection group of ``layer``, the adapters read in place from their pages (the layout
    above; ``mem``: the pages as elements of the pieces' dtype, [pages, page elements];
    group_rows [S]: P r where the segment's adapter targets the group, else 0 (its shrink
    skipped); proj_rank [P, S] int32; cols [P + 1] int32: the projections' column bounds;
    max_rank: the segments' largest rank, known to the caller (no read back from the
    device). The shrink's sums stay in float32 for the expand."""
    _check_rows(x, "x")
    _check_rows(out, "out")
    _check_rows(mem, "mem")
    num_segs, num_proj = seg_rank.shape[0], proj_rank.shape[0]
    if num_segs == 0 or x.shape[0] == 0:
        return
    if max_rank == 0:
        return
    h = torch.zeros(x.shape[0], num_proj * max_rank, dtype=torch.float32, device=x.device)
    common = (mem.stride(0), piece_elems)
    _paged_shrink_kernel[(num_segs, triton.cdiv(num_proj * max_rank, 16))](
        x, mem, h, starts, seg_rank, group_rows, seg_pages, page_ids, x.shape[1], layer,
        num_proj,
        pieces_per_page, *common, a_off, x.stride(0), h.stride(0),
        BLOCK_M=16, BLOCK_R=16, BLOCK_K=32)
    # h's columns per segment: projection j's at j r (r: the segment's rank), as the
    # kernel above stores them (columns of h past a segment's P r unused)
    _paged_expand_kernel[(num_segs, triton.cdiv(out.shape[1], 32))](
        out, h, mem, starts, seg_rank, seg_pages, page_ids, proj_rank, cols, num_segs, layer,
        pieces_per_page, *common, bt_off, out.shape[1], out.stride(0), h.stride(0),
        P=num_proj, BLOCK_M=16, BLOCK_N=32, BLOCK_R=16)
