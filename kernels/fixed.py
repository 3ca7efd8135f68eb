"""Fixed-order torch ops: the torch backend's batch-invariant products, attention and SiLU.

A row's result of every op here is computed in an order that depends only on that row and the
op's shape, never on how many rows share the call, where a prefill chunk starts or whether a
key came from the cache (README: "Same request, same tokens"). They serve the CPU's torch
backend (``TorchOps`` with ``invariant``: ``GPUPOOL_NATIVE=0``, no C compiler, a CPU without
AVX2, a dtype the native kernels do not take, such as float32).

- **Products**: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, which
  ``kernels.linear`` calls for most products anyway) sums each output over K in one order for
  any number of rows (bf16 from 1 row; float32 from 2, its 1-row path being a GEMV with another
  order), where MKL's ``F.linear`` does not (float32 changes from 4 rows) and
  ``kernels.linear``'s cut-offs change kernels by size. That is not a documented property, so
  it is probed at first use per dtype (:func:`supported`: a row's bits alone and at several
  positions of 2..130-row products of three shapes); a 1-row call is padded to the probe's
  ``min_rows``. A CPU without oneDNN bf16 widens to float32 (as ``kernels.linear`` does).
  int8 weights are widened to the activations' dtype and scaled after the product
  (``kernels.linear.linear_int8_reference``'s arithmetic), never through torch's int8 kernel,
  which has another order.
- **Attention**: each query row walks its keys in blocks of :data:`BLOCK` positions from
  position 0, whether they came from the cache, an earlier chunk or this one. An item is one
  KV head of one sequence: per block the float32 scores as the block's keys [BLOCK, D] times
  the query vectors [D, N] (torch's CPU bmm gives a column other bits when an item's row
  count changes or below 16 columns, not when N changes from there: so M and K stay fixed
  and a decode row's few vectors are padded to :data:`COLUMNS`; probed as the products
  are); each vector's maximum over what it may see (exact in any order); ``exp``; the
  block's sum by a halving tree of elementwise adds, then the blocks' sums by a tree over a
  power-of-two count (a block a vector cannot see adds exact zeros); the probabilities times
  V likewise. So a decode row and the same query inside a prefill chunk give the same bits.
- **SiLU**: ``g / (1 + exp(-g))`` in float32 as separate ops: ``F.silu``'s float32 kernel
  gives other bits for the elements its vector loop leaves to the scalar tail (159 of 4,000
  measured), so a row's SiLU depended on the tensor's size.

Everything else of a torch step (RMSNorm's reduction over the hidden size, RoPE, residual
adds) was found invariant as it is; ``tests/test_batch_invariance.py`` checks the whole step.
"""

from __future__ import annotations

import functools
import logging

import torch

from gpupool.kernels import linear as _linear

logger = logging.getLogger(__name__)

BLOCK = 64  # key positions per attention block (a power of two: the halving sum)
COLUMNS = 16  # the fewest query vectors per attention item (bmm's order is fixed from there)
CHUNK_ROWS = 256  # a prefill sequence's query rows per attention pass (memory)
_PROBES: dict[tuple, int] = {}  # (what, dtype) -> min rows (1 or 2), 0: not invariant


def _dnn(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _widened(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    b = None if bias is None else bias.float()
    return _dnn(x.float(), w.float(), b).to(x.dtype)


def _rows_probe(product, dtype: torch.dtype, weights=None) -> int:
    """The fewest rows from which ``product(x, weights(w))``'s row results do not depend on
    the other rows or the row count (1 or 2) and equal ``product(x, w)``'s, or 0 where they
    do not (``weights``: packed copies, say)."""
    g = torch.Generator().manual_seed(29)
    min_rows = 1
    for n, k in ((96, 64), (200, 576), (576, 1536)):
        plain = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
        w = plain if weights is None else weights(plain)
        row = torch.randn(1, k, generator=g).to(dtype)
        pair = torch.cat([row, torch.randn(1, k, generator=g).to(dtype)])
        want = product(pair, plain)[0]
        for m in (2, 3, 5, 16, 17, 33, 64, 65, 130):
            x = torch.randn(m, k, generator=g).to(dtype)
            for pos in sorted({0, m // 2, m - 1}):
                y = x.clone()
                y[pos] = row[0]
                if not torch.equal(product(y, w)[pos], want):
                    return 0
        if not torch.equal(product(row, w)[0], want):
            min_rows = 2
    return min_rows


def _bmm_probe() -> int:
    """1 where float32 ``torch.bmm`` items of the attention's shapes ([BLOCK, D] times
    [D, N] for the scores, [D, BLOCK] times [BLOCK, N] for the values) give a column the same
    bits whatever the item's other columns, its place, N (from COLUMNS up) and the number of
    items, else 0. (torch's CPU bmm does not below 16 columns, nor across an item's row
    count: so the attention keeps M and K fixed and pads N.)"""
    g = torch.Generator().manual_seed(31)
    for m, k in ((BLOCK, 64), (64, BLOCK), (BLOCK, 128), (128, BLOCK), (BLOCK, 32), (32, BLOCK),
                 (BLOCK, 16), (16, BLOCK)):
        a = torch.randn(1, m, k, generator=g)
        col = torch.randn(k, generator=g)
        want = None
        for items, n in ((1, COLUMNS), (3, COLUMNS + 1), (24, 48), (2, 700), (40, COLUMNS)):
            b = torch.randn(items, k, n, generator=g)
            for it, pos in ((0, n - 1), (items - 1, 0), (items // 2, n // 2)):
                b2 = b.clone()
                b2[it, :, pos] = col
                got = torch.bmm(a.expand(items, m, k).contiguous(), b2)[it, :, pos]
                if want is None:
                    want = got
                elif not torch.equal(got, want):
                    return 0
    return 1


def _exp_probe() -> int:
    """torch.exp's bits of an element do not depend on where it sits in the tensor (its
    vector loop against the scalar tail)."""
    g = torch.Generator().manual_seed(37)
    x = torch.randn(4099, generator=g) * 30
    whole = torch.exp(x)
    alone = torch.cat([torch.exp(x[i : i + 1].clone()) for i in range(0, 4099, 7)])
    return int(torch.equal(whole[::7], alone) and torch.equal(torch.exp(x[3:]), whole[3:]))


def _probed(what: str, dtype: torch.dtype, probe) -> int:
    key = (what, dtype)
    if key not in _PROBES:
        try:
            _PROBES[key] = probe()
        except (RuntimeError, AttributeError) as e:
            logger.info("fixed-order %s unavailable for %s (%s)", what, dtype, e)
            _PROBES[key] = 0
        if not _PROBES[key]:
            logger.warning("torch's %s in %s is not batch invariant on this machine: the torch "
                           "backend does not claim it", what, dtype)
    return _PROBES[key]


@functools.cache
def _route(dtype: torch.dtype):
    """(product, min rows) of the invariant products in ``dtype``, or None (probed once:
    the answer is final, so the products ask it per call at a dict lookup's cost)."""
    if dtype in (torch.float32, torch.bfloat16) and _linear._onednn_ok(dtype):
        rows = _probed("products", dtype, lambda: _rows_probe(_dnn, dtype))
        if rows:
            return _dnn, rows
    if dtype == torch.bfloat16 and _linear._onednn_ok(torch.float32):
        rows = _probed("widened products", dtype, lambda: _rows_probe(_widened, dtype))
        if rows:
            return _widened, max(rows, _probed("products", torch.float32,
                                               lambda: _rows_probe(_dnn, torch.float32)))
    return None


def packs(dtype: torch.dtype | None) -> bool:
    """oneDNN's packed weights (``kernels.linear.pack``: 1.2-2.8x faster products) give the
    plain ones' bits for any row count in ``dtype`` (probed): the products may read them."""
    route = _route(dtype) if dtype is not None else None
    if (route is None or route[0] is not _dnn
            or _linear.pack(torch.zeros(16, 16, dtype=dtype)) is None):
        return False
    return _probed("packed products", dtype,
                   lambda: _rows_probe(_dnn, dtype, lambda w: _linear.pack(w))) == route[1]


@functools.cache
def supported(dtype: torch.dtype | None) -> bool:
    """Every op here is fixed-order for ``dtype`` on this machine (probed once)."""
    return (dtype is not None and _route(dtype) is not None
            and _probed("attention products", torch.float32, _bmm_probe) > 0
            and _probed("exp", torch.float32, _exp_probe) > 0)


# ---- products -------------------------------------------------------------------------------
def _bucket(rows: int, min_rows: int) -> int:
    """The row count a product of ``rows`` rows runs at: a power of two up to 64, then a
    multiple of 64. oneDNN keeps a primitive (~0.75 MB of JIT code and buffers) per shape
    it has run, up to 1024 of them (1,500 row counts of one weight grew a process by
    1.1 GB), and the rows beside a row do not change its bits, so padding costs a little
    compute and keeps the shapes few."""
    if rows <= 64:
        return max(min_rows, 1 << (rows - 1).bit_length())
    return -(-rows // 64) * 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ weight.T + bias`` with each row's sums in one order (see the module docstring);
    x: [..., K]. Where this machine has no such product (:func:`supported`), ``kernels.linear``."""
    route = _route(x.dtype) if x.device.type == "cpu" and weight.dtype == x.dtype else None
    if route is None:
        return _linear.linear(x, weight, bias)
    product, min_rows = route
    if weight.is_mkldnn:  # packed (only where :func:`packs`)
        product = _dnn
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows == 0:
        return x.new_zeros(*lead, weight.shape[0])
    padded = _bucket(rows, min_rows)
    if padded > rows:  # zero rows: a lone row through the many-row kernel; few shapes
        x2 = torch.cat([x2, x2.new_zeros(padded - rows, x2.shape[1])])
    y = product(x2.contiguous(), weight if weight.is_mkldnn else weight.contiguous(),
                bias)[:rows]
    return y.reshape(*lead, weight.shape[0])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [T, 2 * inter] with SiLU as separate float32 ops
    (rounded to the input's dtype once, as ``F.silu``)."""
    gate, up = gate_up.chunk(2, dim=-1)
    g = gate.float()
    return (g / (torch.exp(-g) + 1.0)).to(gate_up.dtype) * up


# ---- attention ------------------------------------------------------------------------------
def _halving_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` (a power of two) as a tree of elementwise adds: one order."""
    while x.shape[dim] > 1:
        half = x.shape[dim] // 2
        x = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
    return x.squeeze(dim)


def _tree(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 as :func:`_halving_sum` over its length padded with zeros to a power of
    two: a row whose later entries are zero (blocks it cannot see) gets the same bits
    whatever the padded length (x + 0 is x, and the halves pair i with i + half)."""
    n = x.shape[1]
    width = 1 << (n - 1).bit_length()
    if width > n:
        x = torch.cat([x, x.new_zeros(x.shape[0], width - n, *x.shape[2:])], 1)
    return _halving_sum(x, 1)


def _keys(cache: torch.Tensor, tables: torch.Tensor, ctx: torch.Tensor, blocks: int,
          values: bool, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's first ``blocks`` key blocks, float32, per KV head: keys as
    [S, KVH, blocks, BLOCK, D], values as [S, KVH, blocks, D, BLOCK] (slots past a
    sequence's end, and before ``seen`` — per sequence the first key any of its vectors
    sees, a sliding window's: their pages may have been released — zeroed: stale pages may
    hold NaN, and 0 * NaN is NaN; a key there only meets a score masked out)."""
    bt, kvh, d = cache.shape[1:]
    span = blocks * BLOCK
    pages = -(-span // bt)
    s_ = tables.shape[0]
    # whole pages, one copy (columns past the table's repeat its last: never seen)
    cols = torch.clamp(torch.arange(pages), max=tables.shape[1] - 1)
    x = cache.index_select(0, tables[:, cols].reshape(-1))
    x = x.view(s_, pages * bt, kvh, d)[:, :span]
    if values:  # stale slots zeroed, in the positions past the shortest context only
        low = int(ctx.min())
        if low < span:
            stale = torch.arange(low, span)[None, :] >= ctx[:, None]  # [S, span - low]
            x[:, low:].masked_fill_(stale[:, :, None, None], 0.0)
        top = 0 if seen is None else min(span, int(seen.max()))
        if top > 0:
            before = torch.arange(top)[None, :] < seen[:, None]  # [S, top]
            x[:, :top].masked_fill_(before[:, :, None, None], 0.0)
        out = torch.empty(s_, kvh, blocks, d, BLOCK)
        out.copy_(x.view(s_, blocks, BLOCK, kvh, d).permute(0, 3, 1, 4, 2))
    else:
        out = torch.empty(s_, kvh, blocks, BLOCK, d)
        out.copy_(x.view(s_, blocks, BLOCK, kvh, d).permute(0, 3, 1, 2, 4))
    return out


def _attend(qt: torch.Tensor, qpos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float, used: int, window: int = 0, softcap: float | None = None,
            sink: torch.Tensor | None = None) -> torch.Tensor:
    """Items of one KV head of one sequence, N query vectors each (N >= COLUMNS, the first
    ``used`` real): ``qt`` [I, D, N] (the vectors as columns), ``qpos`` [I, used] their
    positions, ``k`` [I, blocks, BLOCK, D], ``v`` [I, blocks, D, BLOCK]; returns float32
    [I, D, used]. ``window``: a vector sees keys within ``window`` of its position only
    (transformers' sliding window: position - key < window); ``softcap``: scores become
    tanh(s / cap) * cap (each alone: the same bits whatever else is computed); ``sink``
    [I, used]: each vector's sink logit, in its maximum and denominator."""
    items, blocks, _, d = k.shape
    n, span = qt.shape[2], blocks * BLOCK
    qb = qt[:, None].expand(items, blocks, d, n).reshape(items * blocks, d, n)
    scores = torch.bmm(k.reshape(items * blocks, BLOCK, d), qb).view(items, span, n)
    scores = scores[..., :used].mul_(scale)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    first = int(qpos.min()) + 1  # keys before it are seen by every vector
    if first < span:
        key_pos = torch.arange(first, span).view(1, -1, 1)
        scores[:, first:].masked_fill_(key_pos > qpos[:, None, :], float("-inf"))
    if window and int(qpos.max()) >= window:  # keys a window behind some vector
        key_pos = torch.arange(span).view(1, -1, 1)
        scores.masked_fill_(key_pos <= qpos[:, None, :] - window, float("-inf"))
    scores = scores.view(items, blocks, BLOCK, used)
    top = scores.amax((1, 2))  # [I, used]: every vector sees its own key
    if sink is not None:
        top = torch.maximum(top, sink)
    p = torch.exp(scores - top[:, None, None, :])
    den = _tree(_halving_sum(p, 2))  # [I, used]
    if sink is not None:
        den = den + torch.exp(sink - top)
    if used < n:  # the product's N: zero columns up to the padded count
        p = torch.cat([p, p.new_zeros(items, blocks, BLOCK, n - used)], 3)
    pv = torch.bmm(v.reshape(items * blocks, d, BLOCK), p.view(items * blocks, BLOCK, n))
    return _tree(pv.view(items, blocks, d, n)[..., :used]) / den[:, None, :]


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch,
              scale: float, window: int = 0, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decode rows, then each prefill sequence's rows (``models.batch.ForwardBatch``), over
    the paged KV; q: [T, H, D]; returns [T, H, D] in q's dtype.

    Each item is one KV head of one sequence: per key block the scores as [BLOCK, D] times
    the query vectors [D, N] (one bmm shape but N, which torch's bmm is invariant to from
    COLUMNS up: a decode row's vectors are padded to COLUMNS with zeros; probed), the
    vector's maximum over what it may see (exact in any order), exp, each block's sum by a
    halving tree and the blocks' sums by a tree over a power-of-two count (blocks a vector
    cannot see add exact zeros); the probabilities times V likewise. ``sinks`` [H]: each
    head's logit beside its scores (in the maximum and the denominator, no value)."""
    t, h, d = q.shape
    kvh = k_cache.shape[2]
    grp = h // kvh
    out = torch.empty(t, h, d, dtype=q.dtype)
    qf = q.float()
    sink = None if sinks is None else sinks.float().view(kvh, grp)
    nd = batch.num_decode
    if nd:  # every decode row in one pass: its group's vectors padded to COLUMNS
        ctx = batch.decode_context_lens.long()
        blocks = -(-int(ctx.max()) // BLOCK)
        k = _keys(k_cache, batch.decode_block_tables, ctx, blocks, False)
        v = _keys(v_cache, batch.decode_block_tables, ctx, blocks, True,
                  (ctx - window).clamp(min=0) if window else None)
        cols = max(COLUMNS, grp)
        qt = qf.new_zeros(nd, kvh, d, cols)
        qt[..., :grp] = qf[:nd].view(nd, kvh, grp, d).transpose(2, 3)
        qpos = (ctx - 1)[:, None, None].expand(nd, kvh, grp).reshape(nd * kvh, grp)
        o = _attend(qt.view(nd * kvh, d, cols), qpos, k.view(nd * kvh, blocks, BLOCK, d),
                    v.view(nd * kvh, blocks, d, BLOCK), scale, grp, window, softcap,
                    None if sink is None else sink.repeat(nd, 1))
        out[:nd] = o.view(nd, kvh, d, grp).permute(0, 1, 3, 2).reshape(nd, h, d)
    cu = batch.prefill_cu_seqlens.tolist()
    for s, c in enumerate(batch.prefill_context_lens.tolist()):
        r0, n = nd + cu[s], cu[s + 1] - cu[s]
        table = batch.prefill_block_tables[s : s + 1]
        qs = qf[r0 : r0 + n].view(n, kvh, grp, d)
        for lo in range(0, n, CHUNK_ROWS):  # query rows in chunks: the scores' memory bound
            hi = min(n, lo + CHUNK_ROWS)
            rows = hi - lo
            cols = max(COLUMNS, rows * grp)
            blocks = -(-(c - n + hi) // BLOCK)  # the blocks its last row sees
            ctx = torch.tensor([c])
            k = _keys(k_cache, table, ctx, blocks, False)[0]  # [KVH, blocks, BLOCK, D]
            seen = torch.tensor([max(0, c - n + lo - window + 1)]) if window else None
            v = _keys(v_cache, table, ctx, blocks, True, seen)[0]
            qt = qf.new_zeros(kvh, d, cols)
            qt[..., : rows * grp] = qs[lo:hi].permute(1, 3, 0, 2).reshape(kvh, d, rows * grp)
            qpos = torch.arange(c - n + lo, c - n + hi).repeat_interleave(grp)[None]
            o = _attend(qt, qpos.expand(kvh, rows * grp), k, v, scale, rows * grp, window,
                        softcap, None if sink is None else sink.repeat(1, rows))
            out[r0 + lo : r0 + hi] = o.view(kvh, d, rows, grp).permute(2, 0, 3, 1).reshape(
                rows, h, d)
    return out
