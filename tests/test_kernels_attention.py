"""Paged attention: reference and the torch decode (kernels.decode) vs dense attention, and
Triton (interpreted on CPU) vs reference."""

import math

import pytest
import torch

from gpupool.kernels import decode, reference, triton_available

DECODE = {"reference": reference.paged_attention_decode, "torch": decode.paged_attention_decode}


def _paged(lengths, block_tokens, kvh, d, num_pages=64, seed=0, layers=3, layer=1):
    """Random K/V for each sequence, scattered over shuffled pages of a strided multi-layer
    cache (like the engine's), plus the dense copies."""
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(num_pages, layers, 2, block_tokens, kvh, d, generator=g)
    k_cache, v_cache = storage[:, layer, 0], storage[:, layer, 1]
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables, dense_k, dense_v = [], [], []
    for n in lengths:
        nb = math.ceil(n / block_tokens)
        pages = [perm.pop() for _ in range(nb)]
        tables.append(pages)
        dense_k.append(torch.cat([k_cache[p] for p in pages])[:n])
        dense_v.append(torch.cat([v_cache[p] for p in pages])[:n])
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, bt, dense_k, dense_v


def _dense_attention(q, k, v, scale, causal_offset=None):
    """q [n, H, D], k/v [L, KVH, D]; query i sees keys <= causal_offset + i (or all)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k.double()) * scale
    if causal_offset is not None:
        rows = torch.arange(q.shape[0])[:, None] + causal_offset
        s = s.masked_fill(torch.arange(k.shape[0])[None, :] > rows, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), v.double()).float()


@pytest.mark.parametrize("impl", list(DECODE))
@pytest.mark.parametrize("block_tokens", [1, 5, 16])
@pytest.mark.parametrize("heads,kvh", [(4, 4), (4, 2), (6, 1)])
def test_decode_matches_dense(impl, block_tokens, heads, kvh):
    lengths = [1, 7, 33, 16]
    d = 8
    k_cache, v_cache, bt, dk, dv = _paged(lengths, block_tokens, kvh, d)
    q = torch.randn(len(lengths), heads, d)
    out = DECODE[impl](q, k_cache, v_cache, bt, torch.tensor(lengths, dtype=torch.int32), 0.3)
    for b in range(len(lengths)):
        want = _dense_attention(q[b : b + 1], dk[b], dv[b], 0.3)[0]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["reference", "torch", "triton"])
def test_decode_ignores_stale_nan_past_each_sequence(kernel):
    """Pages are reused: what a finished request left past another's end (NaN after a fault)
    must not reach its attention, though padding and partial pages read it."""
    if kernel == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    from gpupool.kernels import paged_attention

    lengths, block_tokens, heads, kvh, d = [3, 21, 8], 4, 4, 2, 16
    k_cache, v_cache, bt, dk, dv = _paged(lengths, block_tokens, kvh, d, seed=3)
    used = {(int(p), t) for b, n in enumerate(lengths) for t in range(n)
            for p in [bt[b, t // block_tokens]]}
    for p in range(k_cache.shape[0]):  # every slot no sequence owns holds NaN
        for t in range(block_tokens):
            if (p, t) not in {(pp, tt % block_tokens) for pp, tt in used}:
                k_cache[p, t] = float("nan")
                v_cache[p, t] = float("nan")
    q = torch.randn(len(lengths), heads, d)
    fn = DECODE.get(kernel) or paged_attention.paged_attention_decode
    out = fn(q, k_cache, v_cache, bt, torch.tensor(lengths, dtype=torch.int32), 0.3)
    assert torch.isfinite(out).all()
    for b in range(len(lengths)):
        want = _dense_attention(q[b : b + 1], dk[b], dv[b], 0.3)[0]
        torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_decode_in_16_bits_matches_reference(dtype):
    """bf16/fp16 caches: the torch decode (16-bit matmuls, fp32 softmax) against the
    reference, both against float64 dense attention: the same order of error."""
    lengths, heads, kvh, d = [5, 40, 17, 64], 9, 3, 64
    k_cache, v_cache, bt, dk, dv = _paged(lengths, 16, kvh, d, seed=5)
    k16, v16 = k_cache.to(dtype), v_cache.to(dtype)
    # seeded: the global generator's state depends on the tests run before this one
    q = torch.randn(len(lengths), heads, d, generator=torch.Generator().manual_seed(6)).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = decode.paged_attention_decode(q, k16, v16, bt, lens, 0.125).float()
    ref = reference.paged_attention_decode(q, k16, v16, bt, lens, 0.125).float()
    for b in range(len(lengths)):
        want = _dense_attention(q[b : b + 1].float(), dk[b].to(dtype).float(),
                                dv[b].to(dtype).float(), 0.125)[0]
        err, ref_err = (got[b] - want).abs().max(), (ref[b] - want).abs().max()
        # floor: two bf16 steps at the outputs' magnitude (~1); one seed in 80 of the global
        # generator gave 0.011 against the reference's 0.005 under a 1e-2 floor
        assert err <= max(2 * ref_err, 2e-2), (b, err, ref_err)


@pytest.mark.parametrize("block_tokens", [3, 16])
def test_prefill_reference_matches_dense(block_tokens):
    lengths, chunks = [9, 20, 5], [9, 6, 1]  # whole prompt; chunk after a prefix; one row
    heads, kvh, d = 4, 2, 8
    k_cache, v_cache, bt, dk, dv = _paged(lengths, block_tokens, kvh, d, seed=1)
    q = torch.randn(sum(chunks), heads, d)
    cu = torch.tensor([0, 9, 15, 16], dtype=torch.int32)
    out = reference.paged_attention_prefill(q, k_cache, v_cache, bt, cu,
                                            torch.tensor(lengths, dtype=torch.int32), 0.25)
    for s, (n, c) in enumerate(zip(lengths, chunks)):
        lo, hi = cu[s].item(), cu[s + 1].item()
        want = _dense_attention(q[lo:hi], dk[s], dv[s], 0.25, causal_offset=n - c)
        torch.testing.assert_close(out[lo:hi], want, atol=1e-5, rtol=1e-5)


def test_write_kv_lands_in_the_addressed_slot():
    storage = torch.zeros(4, 2, 2, 3, 1, 2)  # pages, layers, k/v, block_tokens, kvh, d
    k_cache, v_cache = storage[:, 1, 0], storage[:, 1, 1]
    k = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    reference.write_kv(k_cache, v_cache, k, -k, torch.tensor([2, 0]), torch.tensor([1, 2]))
    assert storage[2, 1, 0, 1].tolist() == [[1.0, 2.0]]
    assert storage[0, 1, 1, 2].tolist() == [[-3.0, -4.0]]
    assert storage[:, 0].abs().sum() == 0  # the other layer is untouched
    assert storage.abs().sum() == 20


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("block_tokens", [4, 16, 22])
@pytest.mark.parametrize("heads,kvh,d", [(4, 2, 16), (3, 3, 64), (9, 3, 24)])
def test_triton_decode_matches_reference(block_tokens, heads, kvh, d):
    from gpupool.kernels import paged_attention as tk

    lengths = [1, 40, 17, 64, 3]
    k_cache, v_cache, bt, _, _ = _paged(lengths, block_tokens, kvh, d, num_pages=96, seed=2)
    q = torch.randn(len(lengths), heads, d)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = tk.paged_attention_decode(q, k_cache, v_cache, bt, lens, d**-0.5)
    want = reference.paged_attention_decode(q, k_cache, v_cache, bt, lens, d**-0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("block_tokens", [4, 22])
@pytest.mark.parametrize("heads,kvh,d", [(4, 2, 16), (3, 1, 24)])
def test_triton_prefill_matches_reference(block_tokens, heads, kvh, d):
    from gpupool.kernels import paged_attention as tk

    lengths, chunks = [37, 20, 5, 18], [37, 3, 1, 17]
    k_cache, v_cache, bt, _, _ = _paged(lengths, block_tokens, kvh, d, num_pages=96, seed=3)
    q = torch.randn(sum(chunks), heads, d)
    cu = torch.tensor([0, 37, 40, 41, 58], dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = tk.paged_attention_prefill(q, k_cache, v_cache, bt, cu, lens, d**-0.5)
    want = reference.paged_attention_prefill(q, k_cache, v_cache, bt, cu, lens, d**-0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _dense_windowed(q, k, v, scale, offset, window, sinks):
    """float64 attention of queries at positions offset.. over keys 0..: each sees its last
    ``window`` keys (0: all), with ``sinks`` [H] (or None) beside the scores."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k.double()) * scale
    rows, keys = torch.arange(q.shape[0])[:, None] + offset, torch.arange(k.shape[0])[None, :]
    hidden = keys > rows
    if window:
        hidden |= keys <= rows - window
    s = s.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(*s.shape[:2], 1)], -1)
    p = s.softmax(-1)[..., : k.shape[0]]
    return torch.einsum("hnl,lhd->nhd", p, v.double()).float()


def _poison_behind(k_cache, v_cache, bt, firsts, block_tokens):
    """Point each sequence's blocks wholly before its first seen key ``firsts[i]`` at a page
    of NaN (as released pages may hold anything): a kernel reading one gives NaN."""
    nan_page = max(set(range(k_cache.shape[0])) - set(bt.flatten().tolist()))  # unused
    k_cache[nan_page], v_cache[nan_page] = float("nan"), float("nan")
    bt = bt.clone()
    for i, first in enumerate(firsts):
        bt[i, : max(0, first) // block_tokens] = nan_page
    return bt


@needs_triton
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_triton_windows_and_sinks_match_dense_and_never_read_behind_the_window(
        window, with_sinks):
    """Sliding windows (the walk starts at the window's tile; pages wholly behind it hold
    NaN) and gpt-oss's sinks, decode and prefill, against float64 attention."""
    from gpupool.kernels import paged_attention as tk

    heads, kvh, d, bts = 4, 2, 16, 4
    sinks = torch.randn(heads) if with_sinks else None
    lengths = [1, 40, 17, 64, 3]
    k_cache, v_cache, bt, dk, dv = _paged(lengths, bts, kvh, d, num_pages=96, seed=5)
    if window:
        bt = _poison_behind(k_cache, v_cache, bt, [n - window for n in lengths], bts)
    q = torch.randn(len(lengths), heads, d)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = tk.paged_attention_decode(q, k_cache, v_cache, bt, lens, 0.3, window, sinks)
    for b, n in enumerate(lengths):
        want = _dense_windowed(q[b : b + 1], dk[b], dv[b], 0.3, n - 1, window, sinks)[0]
        torch.testing.assert_close(got[b], want, atol=2e-5, rtol=2e-5)
    lengths, chunks = [37, 20, 5, 18], [37, 3, 1, 17]
    k_cache, v_cache, bt, dk, dv = _paged(lengths, bts, kvh, d, num_pages=96, seed=6)
    if window:
        bt = _poison_behind(k_cache, v_cache, bt,
                            [n - c - window + 1 for n, c in zip(lengths, chunks)], bts)
    q = torch.randn(sum(chunks), heads, d)
    cu = torch.tensor([0, 37, 40, 41, 58], dtype=torch.int32)
    got = tk.paged_attention_prefill(q, k_cache, v_cache, bt, cu,
                                     torch.tensor(lengths, dtype=torch.int32), 0.3, window,
                                     sinks)
    for s, (n, c) in enumerate(zip(lengths, chunks)):
        want = _dense_windowed(q[cu[s] : cu[s + 1]], dk[s], dv[s], 0.3, n - c, window, sinks)
        torch.testing.assert_close(got[cu[s] : cu[s + 1]], want, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    from gpupool.kernels import paged_attention as tk

    lengths = [1, 300, 77]
    k_cache, v_cache, bt, _, _ = _paged(lengths, 16, 2, 64, num_pages=64, seed=4)
    k_cache, v_cache, bt = k_cache.cuda().to(dtype), v_cache.cuda().to(dtype), bt.cuda()
    q = torch.randn(3, 8, 64, device="cuda", dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    got = tk.paged_attention_decode(q, k_cache, v_cache, bt, lens, 0.125)
    want = reference.paged_attention_decode(q.float(), k_cache.float(), v_cache.float(), bt,
                                            lens, 0.125)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
