"""Triton's grouped GEMM for a mixture's experts (kernels/moe.py), interpreted on CPU: against
float64 products of every expert's de-quantized weight, a row alone against it in a batch,
its blocks' layout, and through an engine (transformers' greedy tokens)."""

from __future__ import annotations

import pytest
import torch

from gpupool import SamplingParams
from gpupool.kernels import quant4, reference, triton_available
from gpupool.models.loader import quantize_rows
from tests.factories import make_engine
from tests.test_parity import hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

E, H, INTER = 5, 64, 64  # experts; hidden and intermediate sizes (multiples of 32: 4-bit)


def _slab(shapes, dtype, g, device="cpu"):
    """Random tensors of ``shapes`` as views of one buffer, not in the list's order (the
    kernel takes the lowest-addressed as its base), each scaled to outputs of order 1."""
    flat = torch.empty(sum(a * b for a, b in shapes) + 3, dtype=dtype, device=device)
    views, at = [None] * len(shapes), 1
    for i in reversed(range(len(shapes))):
        a, b = shapes[i]
        views[i] = flat[at : at + a * b].view(a, b)
        views[i].copy_(torch.randn(a, b, generator=g) / b**0.5)
        at += a * b
    return views


def _experts(form, dtype, g, device="cpu"):
    """(each product's moe.product, each expert's float64 weights (and bias)) for every
    expert's gate_up [2I, H] and down [H, I] in ``form``; the weights on ``device``."""
    from gpupool.kernels import moe

    made, exact = [], []
    for n, k in ((2 * INTER, H), (H, INTER)):
        w = _slab([(n, k)] * E, torch.float32, g)
        biases = [t[0] for t in _slab([(1, n)] * E, dtype, g)] if "bias" in form else None
        if form.startswith("plain"):
            args = ([t.to(dtype) for t in w],)
            values = [t.to(dtype).double() for t in w]
        elif form.startswith("int8"):
            qs = [quantize_rows(t, dtype) for t in w]
            args = ([q for q, _ in qs], [s for _, s in qs])
            values = [q.double() * s.double()[:, None] for q, s in qs]
        else:  # 4-bit: groups of 32 with offsets, or MXFP4's codebook and exponent bytes
            qs = [quant4.quantize(t, 32) for t in w]
            if form.startswith("mxfp4"):
                code = torch.tensor(quant4.E2M1)
                e8 = [torch.randint(122, 127, s.shape, generator=g, dtype=torch.uint8)
                      for _, s, _ in qs]
                args = ([q for q, _, _ in qs], e8, None, [code.clone() for _ in qs])
                values = [quant4.dequantize(q, s, None, code=code).double()
                          for (q, _, _), s in zip(qs, e8)]
            else:
                args = tuple(list(x) for x in zip(*qs))
                values = [quant4.dequantize(q, s, o).double() for q, s, o in qs]
        args = args + (None,) * (4 - len(args)) + (biases,)
        made.append(moe.product(*(None if a is None else [t.to(device) for t in a]
                                  for a in args)))
        exact.append([v if biases is None else (v, b.double()) for v, b in
                      zip(values, biases or [None] * E)])
    return made, exact


def _want(h, idx, top, exact, act):
    """float64: each (row, choice)'s expert MLP times its weight, summed over the choices."""
    out = torch.zeros(h.shape, dtype=torch.float64)
    for r in range(h.shape[0]):
        for c in range(idx.shape[1]):
            x = h[r].double()
            for part in exact:
                w = part[idx[r, c]]
                w, b = w if isinstance(w, tuple) else (w, None)
                x = x @ w.T + (0 if b is None else b)
                if part is exact[0]:
                    x = act(x[None])[0]
            out[r] += x * top[r, c].double()
    return out


@pytest.mark.parametrize("form", ["plain", "plain_bias_swiglu", "int8_bias", "int4", "mxfp4_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 dot
def test_grouped_experts_match_float64_and_a_row_alone(form, dtype):
    """Every form the kernel reads (plain, int8 with row scales, 4-bit with offsets, MXFP4's
    codebook with exponent-byte scales; biases; SiLU and gpt-oss's SwiGLU) against float64
    products of the de-quantized weights; 17 rows, 2 experts each, one expert untouched
    (zero rows) and one with more than a block; each row alone gives its batched bits."""
    from gpupool.kernels import moe

    g = torch.Generator().manual_seed(len(form))
    (gate_up, down), exact = _experts(form, dtype, g)
    rows, k = 17, 2
    h = torch.randn(rows, H, generator=g).to(dtype)
    logits = torch.randn(rows, E, generator=g)
    logits[:, 3] = -9  # expert 3 untouched
    logits[:, 1] = 9  # expert 1: every row, more pairs than a block holds
    top, idx = torch.topk(torch.softmax(logits, -1), k)
    top = top.to(dtype)
    if "swiglu" in form:
        def act(x):
            return reference.swiglu_oai(x, 7.0, 1.702)
    else:
        act = reference.silu_mul
    got = moe.experts(h, idx, top, gate_up, down, act)
    want = _want(h, idx, top, exact, act)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert got.dtype == dtype and got.shape == (rows, H)
    assert (got.double() - want).abs().max() <= tol * want.abs().max(), (form, dtype)
    alone = torch.cat([moe.experts(h[r : r + 1], idx[r : r + 1], top[r : r + 1], gate_up,
                                   down, act) for r in range(rows)])
    assert torch.equal(alone, got)


def test_blocks_lay_each_experts_pairs_in_whole_blocks():
    """The blocks' layout on its own: every sorted pair once, in its expert's blocks, in
    sorted order; padding -1; the blocks' experts ascending, past the last ones marked E; the
    grid's bound holds (pairs in blocks of 16, one expert with 20 pairs, one with none)."""
    from gpupool.kernels import moe

    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(30)])
    idx[:20, 0] = 4
    idx[:20, 1] = torch.where(idx[:20, 1] == 4, 0, idx[:20, 1])
    idx[idx == 5] = 2  # expert 5 untouched
    order, rows, place, pairs, experts = moe.blocks(idx, 6)
    flat = idx.reshape(-1)
    assert torch.equal(rows, order // 2) and sorted(order.tolist()) == list(range(60))
    sorted_experts = flat[order]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    slots = pairs.view(-1, moe.BLOCK_M)
    seen = []
    for b, e in enumerate(experts.tolist()):
        live = [p for p in slots[b].tolist() if p >= 0]
        if e == 6:
            assert not live
            continue
        assert live and all(sorted_experts[p] == e for p in live)
        assert live == list(range(live[0], live[0] + len(live)))  # in order, then padding
        seen += live
    assert seen == list(range(60))
    assert experts.tolist() == sorted(experts.tolist()) and 5 not in experts.tolist()
    assert (experts == 4).sum() == 2  # 20 pairs: two blocks


def test_a_layout_the_kernel_cannot_read_is_refused():
    from gpupool.kernels import moe

    w = [torch.randn(8, 64) for _ in range(3)]
    with pytest.raises(ValueError, match="one shape"):
        moe.product([w[0], w[1], torch.randn(8, 32)])
    with pytest.raises(ValueError, match="some experts"):
        moe.product(w, biases=[torch.randn(8), None, torch.randn(8)])
    with pytest.raises(ValueError, match="dtypes"):
        moe.product([w[0], w[1], w[2].half()])


@pytest.mark.parametrize("variant", ["qwen3_moe", "gpt_oss"])
def test_a_mixture_on_triton_runs_its_experts_grouped_with_transformers_tokens(
        tiny_models, variant):
    """What a CUDA device runs (interpreted here, fp32): a mixture on the Triton backend
    takes the grouped GEMM for every layer's experts (not the loop), and its greedy tokens
    are transformers'."""
    from gpupool.kernels import moe

    folder = tiny_models(variant)
    prompts = random_prompts(4, 6, 20, seed=31)
    want = hf_greedy(folder, prompts, 8)
    calls = []
    real = moe.experts

    def spy(h, *a, **k):
        calls.append(h.shape[0])
        return real(h, *a, **k)

    engine = make_engine(folder, kernels="triton")
    moe.experts = spy
    try:
        assert engine.local.core.workers["m"].model.ops.name == "triton"
        outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))
        assert [list(o.token_ids)[: len(w)] for o, w in zip(outs, want)] == want
        assert calls and max(calls) > 1  # prefill rows and decode rows went through it
    finally:
        moe.experts = real
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", ["plain_bias", "int8", "mxfp4_bias"])
def test_grouped_experts_on_gpu(form):
    """Compiled for real, bf16, against float64; a row alone gives its batched bits."""
    from gpupool.kernels import moe

    g = torch.Generator().manual_seed(7)
    (gate_up, down), exact = _experts(form, torch.bfloat16, g, "cuda")
    h = torch.randn(300, H, generator=g).bfloat16()
    top, idx = torch.topk(torch.softmax(torch.randn(300, E, generator=g), -1), 2)
    top = top.bfloat16()
    got = moe.experts(h.cuda(), idx.cuda(), top.cuda(), gate_up, down,
                      reference.silu_mul).cpu()
    want = _want(h, idx, top, exact, reference.silu_mul)
    assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()
    alone = moe.experts(h[:1].cuda(), idx[:1].cuda(), top[:1].cuda(), gate_up, down,
                        reference.silu_mul).cpu()
    assert torch.equal(alone, got[:1])


def test_experts_of_mixed_forms_or_act_order_keep_the_loop():
    """``backend.expert_tensors`` (what the native call and the grouped GEMM read) refuses a
    layer whose experts differ in form (one int8, the rest plain) or whose 4-bit columns are
    in act order; the backends then answer None (the model's loop)."""
    from types import SimpleNamespace

    from gpupool.kernels import backend

    cfg = SimpleNamespace(num_experts=3, moe_bias=False, activation="silu")
    lw = {f"experts.{e}.{p}_weight": torch.randn(64, 64) for e in range(3)
          for p in ("gate_up", "down")}
    assert [len(t) if t else t for t in backend.expert_tensors(lw, cfg, "down")] == [
        3, None, None, None, None]
    mixed = dict(lw)
    q, s = quantize_rows(lw["experts.1.down_weight"], torch.float32)
    mixed.update({"experts.1.down_weight": q, "experts.1.down_weight_scale": s})
    with pytest.raises(ValueError, match="some experts' down have _scale"):
        backend.expert_tensors(mixed, cfg, "down")
    ordered = dict(lw, **{"experts.2.gate_up_weight_perm": torch.arange(64)})
    with pytest.raises(ValueError, match="act order"):
        backend.expert_tensors(ordered, cfg, "gate_up")
    h, idx = torch.randn(2, 64), torch.tensor([[0, 1], [1, 2]])
    for layer in (mixed, ordered):
        assert backend.TritonOps().experts(None, h, layer, idx, torch.ones(2, 2), cfg) is None


def test_offsets_are_kept_by_value_and_absent_biases_add_nothing():
    """A product remade for weights at the same places (a model back in the same slab)
    reuses its offsets tensor, whose address a captured CUDA graph holds; every expert's
    bias absent (a list of None) adds nothing rather than reading the weights as biases."""
    from gpupool.kernels import moe

    g = torch.Generator().manual_seed(5)
    w = _slab([(H, INTER)] * E, torch.float32, g)
    kept = {}
    first, again = moe.product(w, kept=kept), moe.product(w, kept=kept)
    assert first.offsets is again.offsets and len(kept) == 1
    assert moe.product(w[::-1], kept=kept).offsets is not first.offsets
    biased = moe.product(w, biases=[None] * E)
    assert not biased.has[0]
    x = torch.randn(6, INTER, generator=g)
    idx = torch.randint(0, E, (6, 1), generator=g)
    _, rows, _, pairs, experts = moe.blocks(idx, E)
    assert torch.equal(moe.grouped(x, rows.to(torch.int32), pairs, experts, biased),
                       moe.grouped(x, rows.to(torch.int32), pairs, experts, first))
    with pytest.raises(ValueError, match="columns"):
        moe.grouped(x[:, :32], rows.to(torch.int32), pairs, experts, first)
    with pytest.raises(ValueError, match="contiguous"):
        moe.product(w, biases=[torch.zeros(H + 1)] * E)
