"""Fused Triton kernels for a layer's small ops (issue 32, item 2), as the CPU has in C:

- ``add_rmsnorm``: the residual add and the RMSNorm after it, one pass over each row;
- ``silu_mul``: ``silu(gate) * up`` from the gate/up product's one tensor;
- ``rope_kv``: RoPE on q and k and the write of k and v into their KV pages, one pass.

Each rounds where its torch version (``kernels/reference.py``) rounds: an op on 16-bit
tensors computes in float32 and stores in the tensor's dtype, so the results match the
reference up to float32's last bits (the reductions' order, exp and rsqrt). One program a
row (a token): a row's result never depends on how many rows the step has, and the norm's
sum runs over the row in one fixed block (batch invariance, "Same request, same tokens").
Checked against the reference on CPU under ``TRITON_INTERPRET=1`` and compiled on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(X, D, W, OUT, SUM, N, eps, sx, sd, so, ss,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(D + row * sd + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(SUM + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(OUT + row * so + cols, out.to(OUT.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta, weight, eps)) as ``TorchOps.add_norm``; delta None:
    x as it is. x, delta: [T, N] with unit stride in a row; weight [N]."""
    rows, n = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = x if delta is None else torch.empty_like(out)
    if rows:
        d = x if delta is None else delta
        _add_rmsnorm_kernel[(rows,)](
            x, d, weight, out, total, n, eps, x.stride(0), d.stride(0), out.stride(0),
            total.stride(0), HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n))
    return total, out


@triton.jit
def _silu_mul_kernel(GU, OUT, N, sg, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(GU + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * sg + N + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty)  # F.silu, stored in the dtype
    tl.store(OUT + row * so + cols, (s.to(tl.float32) * u).to(OUT.dtype.element_ty),
             mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2 * inter] (gate first, unit stride)."""
    rows, two = gate_up.shape
    n = two // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0),
                                                        out.stride(0), BLOCK=block)
    return out


@triton.jit
def _rope_kv_kernel(QKV, COS, SIN, Q, KC, VC, PAGES, OFFS,
                    sqkv, scos, ssin, sq_t, sq_h, skc_p, skc_t, skc_h, svc_p, svc_t, svc_h,
                    NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                    HALF_BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # q heads, then k heads, then v heads
    i = tl.arange(0, HALF_BLOCK)
    mask = i < D // 2
    src = QKV + t * sqkv + h * D
    if h < NH + NKV:  # rotate-half: x * cos + rotate(x) * sin, each product stored, then
        x1 = tl.load(src + i, mask=mask, other=0.0)  # the sum (as the reference's ops)
        x2 = tl.load(src + D // 2 + i, mask=mask, other=0.0)
        c1 = tl.load(COS + t * scos + i, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + t * scos + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + t * ssin + i, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + t * ssin + D // 2 + i, mask=mask, other=0.0).to(tl.float32)
        dt = QKV.dtype.element_ty
        a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
        a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
        b1 = (-x2.to(tl.float32) * s1).to(dt).to(tl.float32)
        b2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
        o1 = (a1 + b1).to(dt)
        o2 = (a2 + b2).to(dt)
        if h < NH:
            dst = Q + t * sq_t + h * sq_h
        else:
            page = tl.load(PAGES + t).to(tl.int64)
            off = tl.load(OFFS + t).to(tl.int64)
            dst = KC + page * skc_p + off * skc_t + (h - NH) * skc_h
        tl.store(dst + i, o1, mask=mask)
        tl.store(dst + D // 2 + i, o2, mask=mask)
    else:
        page = tl.load(PAGES + t).to(tl.int64)
        off = tl.load(OFFS + t).to(tl.int64)
        dst = VC + page * svc_p + off * svc_t + (h - NH - NKV) * svc_h
        tl.store(dst + i, tl.load(src + i, mask=mask, other=0.0), mask=mask)
        tl.store(dst + D // 2 + i, tl.load(src + D // 2 + i, mask=mask, other=0.0), mask=mask)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            num_kv_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k of ``qkv`` [T, (H + 2 KVH) D] (rows of unit stride), k and v written
    into ``k_cache``/``v_cache`` [pages, block, KVH, D] at (slot_pages[t], slot_offsets[t]);
    returns q [T, H, D] (``reference.apply_rope`` + ``reference.write_kv``). cos, sin:
    [T, 1, D] (or [T, D]) per token."""
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        cos2, sin2 = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
        grid = (tokens, num_heads + 2 * num_kv_heads)
        _rope_kv_kernel[grid](
            qkv, cos2, sin2, q, k_cache, v_cache, slot_pages, slot_offsets,
            qkv.stride(0), cos2.stride(0), sin2.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NH=num_heads, NKV=num_kv_heads, D=head_dim,
            HALF_BLOCK=triton.next_power_of_2(head_dim // 2))
    return q
