"""A mixture-of-experts layer's expert products as grouped GEMMs in Triton: every expert's
rows in one launch for gate_up and one for down, instead of two products a touched expert.

The (row, choice) pairs are sorted by expert (``reference.expert_order``) and laid out in
blocks of ``BLOCK_M`` pairs, each block one expert's (an expert's run padded to whole blocks,
vLLM's "align block size"), all on the device, nothing read back to the host (a CUDA graph
may hold it): the grid is sized by an upper bound, ``cdiv(pairs, BLOCK_M) + min(experts,
pairs)`` blocks, and a block past the last expert's returns at once. A program computes one
[BLOCK_M, BLOCK_N] tile of its block's expert product, its rows gathered by index, its
weight the expert's (each expert's tensors are separate ones in the model's slab: the kernel
takes the lowest-addressed one of each kind and every expert's element offset from it).
Weights: plain (x's dtype), int8 with a scale per row, or 4-bit (``kernels.quant4``'s
format: group scales, offsets or a codebook, exponent-byte scales; ``int4.weight_block``).
Biases as the products add them (``kernels.int8``: on the float32 sum for plain and int8;
``kernels.int4``: after the rounding for 4-bit).

The tiles have one shape whatever the number of rows, so each output's sum runs in one
order over K: a row's result does not depend on what shares the layer (on a GPU; tested
interpreted). Between the two products the backend's activation runs on the pairs' rows
(elementwise), and the weighted outputs are added per row in ascending expert order as the
model's loop does (``reference.sum_in_expert_order``).

Under ``TRITON_INTERPRET=1`` (the tests on CPU) ``tl.dot`` on bf16 is wrong; tests there use
fp32 and fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpupool.kernels import reference
from gpupool.kernels.int4 import block_product, weight_block

BLOCK_M = 16  # pairs a block: one tile shape for every batch (see above)
BLOCK_N = 64
BLOCK_K = 64
PLAIN, INT8, INT4 = 0, 1, 2


@triton.jit
def _grouped_kernel(
    X, ROWS, PAIRS, BLOCKS, W, S, O, C, B, OFFS, Y,
    N, K, NG, G, E, sx_m, sw_n, sy_m,
    FORMAT: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_CODE: tl.constexpr, HAS_OFFSET: tl.constexpr, E8: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pb = tl.program_id(0)
    pn = tl.program_id(1)
    e = tl.load(BLOCKS + pb)  # the block's expert; E: past the last block
    if e >= E:
        return
    pair = tl.load(PAIRS + pb * BLOCK_M + tl.arange(0, BLOCK_M))  # -1: padding
    mmask = pair >= 0
    row = tl.load(ROWS + pair, mask=mmask, other=0).to(tl.int64)  # x's row of each pair
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_at = tl.load(OFFS + e)  # this expert's tensors: element offsets from each base
    if ALIGNED:  # every expert's weight 16 elements apart from the base: vector loads
        w_at = tl.multiple_of(w_at, 16)
    w = W + w_at
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FORMAT == 2:
        s = S + tl.load(OFFS + E + e)
        o = O + tl.load(OFFS + 2 * E + e)
        c = C + tl.load(OFFS + 3 * E + e)
        j = tl.arange(0, 16)
        for k0 in range(0, K, 32):
            w_lo, w_hi = weight_block(w, s, o, c, n, nmask, k0, NG, G, sw_n,
                                      HAS_CODE, HAS_OFFSET, E8)
            x_lo = tl.load(X + row[:, None] * sx_m + k0 + j[None, :], mask=mmask[:, None],
                           other=0.0)
            x_hi = tl.load(X + row[:, None] * sx_m + k0 + 16 + j[None, :],
                           mask=mmask[:, None], other=0.0)
            acc = block_product(acc, x_lo, x_hi, w_lo, w_hi, IEEE)
        y = acc.to(Y.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(B + tl.load(OFFS + 4 * E + e) + n, mask=nmask, other=0.0)
            y = (y.to(tl.float32) + bias.to(tl.float32)[None, :]).to(Y.dtype.element_ty)
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            xt = tl.load(X + row[:, None] * sx_m + k[None, :],
                         mask=mmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w + n[:, None].to(tl.int64) * sw_n + k[None, :],
                         mask=nmask[:, None] & kmask[None, :], other=0).to(xt.dtype)
            if IEEE:
                acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
            else:
                acc += tl.dot(xt, tl.trans(wt))
        if FORMAT == 1:
            scale = tl.load(S + tl.load(OFFS + E + e) + n, mask=nmask, other=0.0)
            acc = acc * scale.to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = tl.load(B + tl.load(OFFS + 4 * E + e) + n, mask=nmask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y = acc.to(Y.dtype.element_ty)
    tl.store(Y + pair.to(tl.int64)[:, None] * sy_m + n[None, :], y,
             mask=mmask[:, None] & nmask[None, :])


@dataclass
class Product:
    """One product's weights over every expert, as the kernel reads them: each kind's base
    tensor (the lowest-addressed expert's) and ``offsets`` [5, E] (int64 elements from the
    bases: weight, scale, offset, codebook, bias; 0 where a kind is absent)."""

    fmt: int
    n: int
    k: int
    groups: int
    bases: tuple
    offsets: torch.Tensor
    has: tuple  # (bias, code, offset, exponent-byte scales)
    aligned: bool  # every weight's offset a multiple of 16 elements (a load hint)
    tensors: tuple  # every expert's, held: the offsets point into them


def _based(tensors: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, list[int]]:
    """(the lowest-addressed tensor, each one's element offset from it); (None, zeros) for
    an absent kind. ValueError: mixed presence, dtypes or devices, or an address apart by
    no whole number of elements."""
    if all(t is None for t in tensors):
        return None, [0] * len(tensors)
    if any(t is None for t in tensors):
        raise ValueError("some experts have it, some do not")
    first = tensors[0]
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        raise ValueError("experts of different dtypes or devices")
    base = min(tensors, key=lambda t: t.data_ptr())
    size = first.element_size()
    offsets = []
    for t in tensors:
        d = t.data_ptr() - base.data_ptr()
        if d % size:
            raise ValueError("an expert's tensor is not element-aligned with the others'")
        offsets.append(d // size)
    return base, offsets


def product(weights, scales=None, goffsets=None, codes=None, biases=None,
            kept: dict | None = None) -> Product:
    """A product's kernel view of every expert's weight (and its scales, offsets,
    codebooks and biases, lists or None). ValueError: a layout the kernel cannot read.
    ``kept``: the offsets tensors made so far, by their values, to reuse (a captured CUDA
    graph holds an offsets tensor's address: a model back in the same slab after a swap
    keeps its graphs, and must find its offsets where they were)."""
    first = weights[0]
    if any(w.shape != first.shape or w.dim() != 2 or w.stride(-1) != 1 for w in weights):
        raise ValueError("the experts' weights are not matrices of one shape with unit "
                         "column strides")
    if any(w.stride(0) != first.stride(0) for w in weights):
        raise ValueError("the experts' weights have different row strides")
    fmt = PLAIN if scales is None else INT8 if first.dtype == torch.int8 else INT4
    n, k = first.shape[0], first.shape[1] * (2 if fmt == INT4 else 1)
    groups = scales[0].shape[1] if fmt == INT4 and scales[0].dim() == 2 else 0
    if fmt == INT4 and (k % 32 or not groups or k % groups or (k // groups) % 32):
        raise ValueError("4-bit experts need groups of a multiple of 32 columns")
    shapes = ((scales, (n, groups) if fmt == INT4 else (n,)), (goffsets, (n, groups)),
              (codes, (16,)), (biases, (n,)))
    for t, shape in shapes:
        if t is not None and any(x is not None and (tuple(x.shape) != shape
                                                    or not x.is_contiguous()
                                                    or x.device != first.device) for x in t):
            raise ValueError(f"an expert's scales, offsets, codebook or bias is not a "
                             f"contiguous {shape} on {first.device}")
    none = [None] * len(weights)
    parts = [_based(list(t) if t is not None else none)
             for t in (weights, scales, goffsets, codes, biases)]
    values = tuple(tuple(p[1]) for p in parts)
    kept = {} if kept is None else kept
    if (first.device, values) not in kept:
        kept[first.device, values] = torch.tensor(values, dtype=torch.int64,
                                                  device=first.device)
    has = (parts[4][0] is not None, parts[3][0] is not None, parts[2][0] is not None,
           parts[1][0] is not None and parts[1][0].dtype == torch.uint8)
    return Product(fmt, n, k, groups, tuple(p[0] for p in parts), kept[first.device, values],
                   has, all(o % 16 == 0 for o in values[0]),
                   (weights, scales, goffsets, codes, biases))


def blocks(idx: torch.Tensor, num_experts: int):
    """(order, rows, place) of ``reference.expert_order`` and, for the kernel, ``pairs``
    (each block's slots: the sorted pair's index, -1 padding) and ``block_experts`` (each
    block's expert, ``num_experts`` past the last), computed on the device."""
    order, rows, place = reference.expert_order(idx)
    flat = idx.reshape(-1)
    total, dev = flat.numel(), idx.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = counts.cumsum(0) - counts
    pends = padded.cumsum(0)
    experts = flat.index_select(0, order)
    i = torch.arange(total, device=dev)
    at = (pends - padded).index_select(0, experts) + i - starts.index_select(0, experts)
    num_blocks = triton.cdiv(total, BLOCK_M) + min(num_experts, total)
    pairs = torch.full((num_blocks * BLOCK_M,), -1, dtype=torch.int32, device=dev)
    pairs.index_copy_(0, at, i.to(torch.int32))
    starts_of = torch.arange(num_blocks, device=dev) * BLOCK_M
    block_experts = torch.searchsorted(pends, starts_of, right=True).to(torch.int32)
    return order, rows, place, pairs, block_experts


def grouped(x: torch.Tensor, rows: torch.Tensor, pairs: torch.Tensor,
            block_experts: torch.Tensor, p: Product) -> torch.Tensor:
    """[pairs, N]: sorted pair i's row of ``x`` (``rows[i]``) times its expert's weight."""
    if x.shape[-1] != p.k:
        raise ValueError(f"x has {x.shape[-1]} columns, the experts' weights {p.k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    total = rows.shape[0]
    y = torch.empty(total, p.n, dtype=x.dtype, device=x.device)
    if total == 0:
        return y
    w, s, o, c, b = p.bases
    num_experts = p.offsets.shape[1]
    grid = (block_experts.shape[0], triton.cdiv(p.n, BLOCK_N))
    _grouped_kernel[grid](
        x, rows, pairs, block_experts, w, s if s is not None else w, o if o is not None else w,
        c if c is not None else w, b if b is not None else w, p.offsets, y,
        p.n, p.k, p.groups, p.k // p.groups if p.groups else 0, num_experts,
        x.stride(0), w.stride(0), y.stride(0),
        FORMAT=p.fmt, ALIGNED=p.aligned, HAS_BIAS=p.has[0], HAS_CODE=p.has[1],
        HAS_OFFSET=p.has[2], E8=p.has[3],
        IEEE=x.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4,
    )
    return y


def experts(h: torch.Tensor, idx: torch.Tensor, top: torch.Tensor, gate_up: Product,
            down: Product, act) -> torch.Tensor:
    """A mixture layer's output for rows ``h`` [T, H] (experts ``idx`` [T, k], routing
    weights ``top`` in h's dtype): both products grouped, ``act`` (the backend's activation
    of [gate | up]) between them, each pair's output times its weight, the pairs added per
    row in ascending expert order (the model's loop's arithmetic)."""
    order, rows, place, pairs, block_experts = blocks(idx, gate_up.offsets.shape[1])
    mid = act(grouped(h, rows.to(torch.int32), pairs, block_experts, gate_up))
    sorted_rows = torch.arange(rows.shape[0], dtype=torch.int32, device=h.device)
    y = grouped(mid, sorted_rows, pairs, block_experts, down)
    y = y * top.reshape(-1).index_select(0, order)[:, None]
    return reference.sum_in_expert_order(y, rows, place, tuple(idx.shape))
