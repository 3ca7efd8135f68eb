"""Paged attention in Triton: decode (one query per sequence) and prefill (a chunk of queries
over the cached prefix). Same signatures and semantics as :mod:`gpupool.kernels.reference`.

Both walk the context in tiles of BLOCK_N tokens with an online softmax; each token's address
is computed from the block table (page = table[t // block_tokens], slot = t % block_tokens),
so any page geometry works. Scores are accumulated in float32.

``window`` > 0: a query at position p sees keys p - window + 1 .. p only (transformers'
sliding window): the walk starts at the tile of the first key any of a program's queries
sees, and keys before a query's window are masked (never loaded: their pages may have been
released). ``sinks`` [H] (gpt-oss): each head's logit beside the scores, the online softmax
started from it (maximum the sink, sum 1), no value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    Q, K, V, BT, LENS, O, SINKS, scale, window,
    sq_b, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, so_b, so_h,
    BLOCK_TOKENS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    length = tl.load(LENS + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_SINKS:
        m_i = tl.load(SINKS + h).to(tl.float32)
        l_i = tl.zeros([], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # the first key it sees
    for start in range((lo // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = (t < length) & (t >= lo)
        page = tl.load(BT + b * sbt_b + t // BLOCK_TOKENS, mask=tmask, other=0).to(tl.int64)
        slot = (t % BLOCK_TOKENS).to(tl.int64)
        mask2 = tmask[:, None] & dmask[None, :]
        k = tl.load(K + page[:, None] * sk_p + slot[:, None] * sk_t + kvh * sk_h + d[None, :],
                    mask=mask2, other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, 1) * scale
        s = tl.where(tmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + page[:, None] * sv_p + slot[:, None] * sv_t + kvh * sv_h + d[None, :],
                    mask=mask2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = acc / l_i
    tl.store(O + b * so_b + h * so_h + d, out.to(O.dtype.element_ty), mask=dmask)


@triton.jit
def _prefill_kernel(
    Q, K, V, BT, CU, LENS, O, SINKS, scale, window,
    sq_t, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_s, so_t, so_h,
    BLOCK_TOKENS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_lo = tl.load(CU + s)
    n = tl.load(CU + s + 1) - q_lo
    if mb * BLOCK_M < n:
        kvh = h // GROUP
        length = tl.load(LENS + s)
        prefix = length - n
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(Q + (q_lo + rows)[:, None] * sq_t + h * sq_h + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        pos = prefix + rows  # absolute position of each query row
        if HAS_SINKS:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h).to(tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        else:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_end = tl.minimum(length, prefix + (mb + 1) * BLOCK_M)
        # the first key the block's first row sees
        lo = tl.where(window > 0, tl.maximum(prefix + mb * BLOCK_M - window + 1, 0), 0)
        for start in range((lo // BLOCK_N) * BLOCK_N, kv_end, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = (t < kv_end) & (t >= lo)
            page = tl.load(BT + s * sbt_s + t // BLOCK_TOKENS, mask=tmask, other=0).to(tl.int64)
            slot = (t % BLOCK_TOKENS).to(tl.int64)
            mask2 = tmask[:, None] & dmask[None, :]
            k = tl.load(K + page[:, None] * sk_p + slot[:, None] * sk_t + kvh * sk_h + d[None, :],
                        mask=mask2, other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
            ok = (t[None, :] <= pos[:, None]) & tmask[None, :]
            if window > 0:
                ok = ok & (t[None, :] > pos[:, None] - window)
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
            p = tl.exp(sc - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            v = tl.load(V + page[:, None] * sv_p + slot[:, None] * sv_t + kvh * sv_h + d[None, :],
                        mask=mask2, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + (q_lo + rows)[:, None] * so_t + h * so_h + d[None, :],
                 out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _check(q, k_cache, v_cache, block_tables):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("q must be [N, H, D] and caches [P, block_tokens, KVH, D]")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError("head_dim differs, or heads are not a multiple of kv heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head_dim axis must be contiguous")
    if not block_tables.is_contiguous():
        raise ValueError("block_tables must be contiguous")


def paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                           window: int = 0, sinks: torch.Tensor | None = None):
    _check(q, k_cache, v_cache, block_tables)
    out = torch.empty_like(q)
    batch, heads, head_dim = q.shape
    if batch == 0:
        return out
    _decode_kernel[(batch, heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q if sinks is None else sinks.contiguous(), scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_TOKENS=k_cache.shape[1], GROUP=heads // k_cache.shape[2], HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=32, HAS_SINKS=sinks is not None,
    )
    return out


def paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                            window: int = 0, sinks: torch.Tensor | None = None):
    _check(q, k_cache, v_cache, block_tables)
    out = torch.empty_like(q)
    num_seqs = context_lens.shape[0]
    if num_seqs == 0:
        return out
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m = 16
    head_dim = q.shape[2]
    grid = (num_seqs, q.shape[1], triton.cdiv(max_q, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q if sinks is None else sinks.contiguous(), scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_TOKENS=k_cache.shape[1], GROUP=q.shape[1] // k_cache.shape[2], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_SINKS=sinks is not None,
    )
    return out
