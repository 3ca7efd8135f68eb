"""Plain-torch versions of every kernel: the CPU path and the tests' ground truth.

Paged caches are ``[num_pages, block_tokens, num_kv_heads, head_dim]`` views (possibly strided:
a page also holds the other layers). Token ``t`` of a sequence lives at page
``block_tables[s, t // block_tokens]``, slot ``t % block_tokens``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype; a
    float32 ``weight`` on narrower ``x`` scales in float32 and rounds once (Gemma's norms,
    whose weights are kept in float32)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return (xf * weight).to(x.dtype)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x: [T, heads, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor | None:
    """The order a partial-rotary head's dimensions are stored in so that ``apply_rope``,
    which rotates pairs (i, i + head_dim / 2), rotates transformers' pairs
    (i, i + rotary_dim / 2) of the first ``rotary_dim`` dimensions: their halves at 0 and
    head_dim / 2, the dimensions that do not rotate between (their table rows are cos 1,
    sin 0). None when every dimension rotates."""
    d, r = head_dim, rotary_dim
    if r == d:
        return None
    p = d - r
    return torch.tensor([*range(r // 2), *range(r, r + p // 2), *range(r // 2, r),
                         *range(r + p // 2, d)])


def permute_heads(rows: torch.Tensor, order: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """``rows`` [heads * head_dim, ...] with each head's rows in ``order``."""
    if order is None:
        return rows
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim, *rows.shape[1:])[:, order].reshape(rows.shape)


def deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` 0, 2, 4, .. then 1, 3, 5, ..: gpt-oss's gate_up outputs (gate and up
    interleaved in its checkpoint) as [gate | up], for its weights and an adapter's B."""
    return torch.cat((rows[0::2], rows[1::2]))


def act_mul(gate_up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up of ``gate_up`` = [gate | up]: "gelu_tanh" (transformers' GeGLU: gelu
    with the tanh approximation), else ``silu_mul``'s."""
    if kind != "gelu_tanh":
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def swiglu_oai(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's activation of ``gate_up`` = [gate | up] (its interleaved halves split at
    load): gate clamped above at ``limit``, up to +-``limit``, then
    ``(up + 1) * gate * sigmoid(alpha * gate)``, in the input's dtype as transformers."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_order(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture's (row, choice) pairs of ``idx`` [rows, k] sorted by expert (stable: rows
    ascending within one): (``order``, the pairs' flat indices ``row * k + choice`` in that
    order; ``rows``, their rows; ``place``, each pair's rank among its row's k experts in
    ascending order), what :func:`sum_in_expert_order` puts the outputs back by."""
    k = idx.shape[1]
    order = torch.argsort(idx.reshape(-1), stable=True)
    place = idx.argsort(dim=1).argsort(dim=1).reshape(-1).index_select(0, order)
    return order, order // k, place


def sum_in_expert_order(y: torch.Tensor, rows: torch.Tensor, place: torch.Tensor,
                        shape: tuple[int, int]) -> torch.Tensor:
    """The weighted expert outputs ``y`` [pairs, H] (in :func:`expert_order`'s order, each
    rounded to the model's dtype) added per row in float32 from zero in ascending expert
    order, rounded once to y's dtype: [rows, H]. ``shape``: (rows, k)."""
    rows_n, k = shape
    placed = torch.zeros(rows_n * k, y.shape[1], dtype=torch.float32, device=y.device)
    placed = placed.index_copy_(0, rows * k + place, y.float()).view(rows_n, k, -1)
    acc = torch.zeros(rows_n, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        acc += placed[:, j]
    return acc.to(y.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2 * inter] (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens ``[0, length)`` of one or more sequences from a paged cache.

    block_table: [M] -> [length, kvh, d]; [B, M] -> [B, length, kvh, d].
    """
    bt = cache.shape[1]
    num_blocks = -(-length // bt)
    table = block_table[..., :num_blocks]
    # index_select copies whole pages (contiguous runs) and is ~4x faster than cache[table]
    pages = cache.index_select(0, table.reshape(-1))  # [n * nb, bt, kvh, d]
    pages = pages.view(*table.shape[:-1], num_blocks * bt, *cache.shape[2:])
    return pages[..., :length, :, :]


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    min_len: int | None = None,
) -> torch.Tensor:
    """Semantics: ``out[b] = softmax(q[b] @ K_b^T * scale) @ V_b`` over the ``context_lens[b]``
    cached tokens of sequence b (the newest token's K/V already written), GQA by head groups.

    q: [B, H, D]; k_cache, v_cache: [P, bt, KVH, D]; block_tables: [B, M] int;
    context_lens: [B] int (>= 1); max_len, min_len: its largest and smallest value, if known.
    Returns [B, H, D] in q's dtype.
    """
    if max_len is None or min_len is None:
        max_len, min_len = int(context_lens.max()), int(context_lens.min())
    k = _gather(k_cache, block_tables, max_len).transpose(1, 2)  # [B, KVH, L, D]
    v = _gather(v_cache, block_tables, max_len).transpose(1, 2)
    mask = None  # every sequence as long as the longest: nothing to hide
    if min_len < max_len:
        mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]  # [B, L]
        # stale page contents past a sequence's end (maybe NaN, and NaN * 0 is NaN) never
        # reach the sum
        k = k.masked_fill(~mask[:, None, :, None], 0.0)
        v = v.masked_fill(~mask[:, None, :, None], 0.0)
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k,
        v,
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Semantics: causal attention of a chunk of new tokens over its cached prefix and itself.

    Sequence s owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` (n_s rows), which are its
    tokens ``context_lens[s] - n_s ... context_lens[s] - 1``; query i attends to cached tokens
    ``0 ... context_lens[s] - n_s + i``. Their K/V are already written to the cache.

    q: [T, H, D]; k_cache, v_cache: [P, bt, KVH, D]; block_tables: [S, M] int;
    cu_seqlens_q: [S + 1] int; context_lens: [S] int. Returns [T, H, D].
    """
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s, length in enumerate(lens):
        lo, hi = cu[s], cu[s + 1]
        n = hi - lo
        k = _gather(k_cache, block_tables[s], length).transpose(0, 1)  # [KVH, L, D]
        v = _gather(v_cache, block_tables[s], length).transpose(0, 1)
        # 4-D ([1, H, n, D]): torch's fused (flash) CPU kernel takes only batched inputs;
        # 3-D ones fall back to the math path (5x slower on a 1000-token prompt)
        qs = q[lo:hi].transpose(0, 1)[None]  # [1, H, n, D]
        k, v = k[None], v[None]
        if n == length:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            rows = torch.arange(n, device=q.device)[:, None] + (length - n)
            mask = torch.arange(length, device=q.device)[None, :] <= rows  # [n, L]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pages: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """Semantics: ``k_cache[slot_pages[t], slot_offsets[t]] = k[t]`` (same for v).

    k, v: [T, KVH, D]; slot_pages, slot_offsets: [T] long.
    """
    k_cache[slot_pages, slot_offsets] = k
    v_cache[slot_pages, slot_offsets] = v


def sgmv_shrink(
    x: torch.Tensor,
    w: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_rows: torch.Tensor,
    product=None,
) -> torch.Tensor:
    """Semantics: for each segment s, rows ``lo = seg_starts[s] ... hi = seg_starts[s+1]``:
    ``out[lo:hi, :seg_rows[s]] = x[lo:hi] @ w[seg_slots[s], :seg_rows[s]].T``; every other
    entry of out is 0 (rows in no segment cost nothing).

    x: [T, K]; w: [num_slots, R, K]; seg_starts: [S + 1] int; seg_slots, seg_rows: [S] int.
    Returns out: [T, R] in w's dtype (the adapters' dtype, which may be wider than x's: the
    product is computed in it). ``product``: the products' function (``kernels.linear.linear``;
    the fixed-order backend passes its own).
    """
    from gpupool.kernels.linear import linear

    linear = product or linear
    out = x.new_zeros(x.shape[0], w.shape[1], dtype=w.dtype)
    xw = x.to(w.dtype)  # no copy when the dtypes agree
    starts = seg_starts.tolist()
    for s, (slot, rows) in enumerate(zip(seg_slots.tolist(), seg_rows.tolist())):
        lo, hi = starts[s], starts[s + 1]
        if hi > lo and rows:
            out[lo:hi, :rows] = linear(xw[lo:hi], w[slot, :rows])
    return out


def sgmv_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_ranks: torch.Tensor,
    seg_h_offsets: torch.Tensor,
    product=None,
) -> None:
    """Semantics: for each segment s (rows lo:hi, rank r, offset o, slot i):
    ``y[lo:hi] += h[lo:hi, o:o+r] @ w[i, :, :r].T``, in place; other rows are untouched.

    y: [T, N] (may be a column slice of a wider output); h: [T, Rh]; w: [num_slots, N, R];
    seg_starts: [S + 1] int; seg_slots, seg_ranks, seg_h_offsets: [S] int. The product is
    computed in w's dtype and added into y (rounded to y's dtype once). ``product``: as
    :func:`sgmv_shrink`'s.
    """
    from gpupool.kernels.linear import linear

    linear = product or linear
    h = h.to(w.dtype)  # no copy when the dtypes agree
    starts = seg_starts.tolist()
    segs = zip(seg_slots.tolist(), seg_ranks.tolist(), seg_h_offsets.tolist())
    for s, (slot, rank, off) in enumerate(segs):
        lo, hi = starts[s], starts[s + 1]
        if hi > lo and rank:
            y[lo:hi].add_(linear(h[lo:hi, off : off + rank], w[slot, :, :rank]))
