"""The fused CPU kernels (kernels/native.c, built here by kernels/native.py) against their torch
versions, and the model's bf16 forward pass on them against its torch path and transformers.

Every machine that runs these tests has a C compiler (the project's CI does); a machine without
one must fall back to the torch path, which the last test checks in a process that has none."""

import functools
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpupool import SamplingParams
from gpupool.kernels import decode, native, reference
from gpupool.kernels.backend import NativeOps
from gpupool.models.cpu import cpu_flags
from tests import TESTS_PACKAGE
from tests.factories import (
    hf_gap_in_ulps,
    hf_greedy_with,
    lora_pages,
    make_engine,
    make_peft_adapter,
    random_prompts,
)
from tests.test_kernels_attention import _dense_attention, _paged

BF = torch.bfloat16
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def _rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart each pair is (same sign assumed where it matters)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def test_the_kernels_build_here_and_pass_their_own_check():
    assert HAS_CC, "these tests expect a C compiler (cc, gcc or clang) on PATH"
    assert native.available()
    for seed in range(5):
        assert native.failures(seed) == []


@pytest.mark.parametrize("rows", [1, 5, 160])  # 160 x 576: the threaded branch
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_matches_torch(rows, with_delta):
    dim = 576
    base = _rand(rows, dim + 8, seed=1, scale=3.0)  # rows with a stride past their width
    x = base[:, :dim]
    delta = _rand(rows, dim, seed=2) if with_delta else None
    w = (torch.rand(dim, generator=torch.Generator().manual_seed(3)) + 0.5).to(BF)
    want_x, want = native.add_rmsnorm_torch(x.clone(), delta, w, 1e-5)
    got = native.add_rmsnorm(x, delta, w, 1e-5)
    assert torch.equal(x, want_x)  # the residual add, in place: bit for bit
    assert torch.equal(base[:, dim:], _rand(rows, dim + 8, seed=1, scale=3.0)[:, dim:])
    # rounded twice (the normed value, then times w): a last-bit difference in the inverse
    # norm (the kernel sums squares in its own order, torch's mean in one that varies with
    # the CPU) can move an output by two steps, never further from float64 than torch's
    ulps = _ulps_apart(got, want)
    assert ulps.max() <= 2 and (ulps == 0).float().mean() >= 0.999
    xd = want_x.double()
    exact = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    their_err = (want.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= their_err * (1 + 2**-8)


@pytest.mark.parametrize("rows", [1, 5, 160])
def test_a_float32_weight_norm_scales_in_float32_and_rounds_once(rows):
    """Gemma's norms (weights kept as 1 + weight in float32): as reference.rms_norm, within
    a bf16 step (the sum of squares in the kernel's order), never further from float64."""
    dim = 640
    x = _rand(rows, dim, seed=7, scale=3.0)
    delta = _rand(rows, dim, seed=8)
    w = torch.rand(dim, generator=torch.Generator().manual_seed(9)) + 0.5
    want_x = (x.float() + delta.float()).to(BF)
    want = reference.rms_norm(want_x, w, 1e-6)
    got = native.add_rmsnorm(x, delta, w, 1e-6)
    assert torch.equal(x, want_x)
    ulps = _ulps_apart(got, want)
    assert ulps.max() <= 1 and (ulps == 0).float().mean() >= 0.99
    xd = want_x.double()
    exact = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.01
    with pytest.raises(ValueError, match="bf16 or float32"):
        native.add_rmsnorm(x, None, w.double(), 1e-6)


@pytest.mark.parametrize("rows", [1, 70])  # 70 rows: the threaded branch
def test_gelu_tanh_mul_is_the_exact_geglu_rounded_as_torch_rounds(rows):
    """Gemma's GeGLU (gelu with the tanh approximation, rounded to bf16, times up, rounded):
    within one bf16 step of that computed in float64, everywhere; torch's bits on most
    values, and where not, no further from float64 than torch's (torch's 1 + tanh(y)
    cancels for gates below about -2)."""
    gu = _rand(rows, 2 * 2048, seed=10, scale=3.0)
    gu[0, :7] = torch.tensor([0.0, -0.0, 12.0, -12.0, 1e-6, -60.0, -5.0]).to(BF)
    got = native.gelu_tanh_mul(gu)
    g, up = gu.double().chunk(2, dim=-1)
    y = (2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)
    exact = (g / (1 + torch.exp(-2 * y))).to(BF).double() * up  # (= 0.5 g (1 + tanh y))
    def steps(a, b):  # bf16 steps apart; values both below 1e-30 (zeros of either sign,
        # and what e^-2y's range gives near float32's least normal) alike
        tiny = (a.double().abs() < 1e-30) & (b.double().abs() < 1e-30)
        return torch.where(tiny, 0, _ulps_apart(a, b))

    assert steps(got, exact.to(BF)).max() <= 1
    theirs = reference.act_mul(gu, "gelu_tanh")
    assert (steps(got, theirs) == 0).float().mean() >= 0.9
    assert ((got.double() - exact).abs() <= (theirs.double() - exact).abs()).all()


@pytest.mark.parametrize("rows", [1, 3, 70])  # 70 x 8 heads of 128: the threaded branch
def test_head_norms_are_each_heads_add_rmsnorm_in_place(rows):
    """The q and k norms of Qwen3 (bf16 weights) and Gemma 3 (float32: the k heads' here)
    (native.head_norms, decode_layers' too): each head of a qkv row normed in place as
    add_rmsnorm norms a row of head_dim, bit for bit; the other heads and the row's tail past
    its width untouched."""
    nq, nkv, d = 8, 2, 128
    width = (nq + 2 * nkv) * d
    base = _rand(rows, width + 8, seed=4, scale=3.0)
    qkv = base[:, :width]
    before = base.clone()
    wq, wk = ((torch.rand(d, generator=torch.Generator().manual_seed(s)) + 0.5).to(BF)
              for s in (5, 6))
    wk = wk.float()  # (Gemma 3's: float32)
    native.head_norms(qkv, 0, nq, d, wq, 1e-6)
    native.head_norms(qkv, nq, nkv, d, wk, 1e-6)
    for lo, n, w in ((0, nq, wq), (nq, nkv, wk)):
        heads = before[:, lo * d : (lo + n) * d].reshape(-1, d)
        want = native.add_rmsnorm(heads.contiguous(), None, w, 1e-6).view(rows, n * d)
        assert torch.equal(qkv[:, lo * d : (lo + n) * d], want)
    assert torch.equal(base[:, (nq + nkv) * d :], before[:, (nq + nkv) * d :])
    with pytest.raises(ValueError, match="do not fit"):
        native.head_norms(qkv, nq + nkv, nkv + 1, d, wk, 1e-6)  # past the row


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(960, 576), (49152 // 8, 576), (576, 1536), (37, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_linear(rows, n, k, with_bias):
    """Against float64 on the same bf16 inputs: as close as oneDNN's bf16 product."""
    # built exactly where the CPU has AVX-512 BF16 or AVX2 + FMA; elsewhere torch's product
    flags = cpu_flags()
    if native.target() == "native":
        assert native.has_gemv() == ("avx512_bf16" in flags or {"avx2", "fma"} <= flags)
    if not native.has_gemv():
        pytest.skip("this build has no bf16 GEMV")
    x = _rand(rows, k + 16, seed=12)[:, :k]  # strided rows
    w, b = _rand(n, k, seed=13), (_rand(n, seed=14) if with_bias else None)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got, theirs = native.gemv(x, w, b), torch.nn.functional.linear(x, w, b)
    err, their_err = (got.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert err <= 1.5 * their_err, (err, their_err)
    assert (_ulps_apart(got, theirs) <= 1).float().mean() >= 0.99


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (37, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_int8_matches_the_int8_linear(rows, n, k, with_bias):
    """Against gpupool's int8 linear (kernels.linear.linear_int8): no further from float64 than
    it; the product before the bias within two bf16 steps of its for 99.5% of the outputs, and
    every one within two steps plus 2^-9 of sum |x_i q_i| scale (a dot product's error scale)
    (only outputs near zero, where the sum cancels, are further apart in steps: its reference
    path rounds the product before the scale, this kernel once, and quantizes x to int16)."""
    from gpupool.kernels.linear import linear_int8

    if native.target() == "native":  # a forced target (GPUPOOL_NATIVE_MARCH) has its own
        flags = cpu_flags()
        assert native.has_gemv_int8() == ("avx512bw" in flags or {"avx2", "fma"} <= flags)
    if not native.has_gemv_int8():
        pytest.skip("this build has no int8 GEMV (AVX-512 BW or AVX2)")
    g = torch.Generator().manual_seed(15)
    x = _rand(rows, k + 8, seed=16)[:, :k]
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.02 + 0.001).to(BF)
    b = _rand(n, seed=17) if with_bias else None
    exact = (x.double() @ q.double().T) * scale.double() + (0 if b is None else b.double())
    got, theirs = native.gemv_int8(x, q, scale, b), linear_int8(x, q, scale, b)
    err, their_err = (got.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert err <= 1.5 * their_err + 1e-6, (err, their_err)
    got, theirs = native.gemv_int8(x, q, scale), linear_int8(x, q, scale)
    assert (_ulps_apart(got, theirs) <= 2).float().mean() >= 0.995
    magnitude = (x.double().abs() @ q.double().abs().T) * scale.double()
    two_steps = theirs.double().abs() * 2**-7
    assert ((got.double() - theirs.double()).abs() <= two_steps + magnitude * 2**-9).all()


def _bf16_product(rows, w, bias):
    return native.gemv(rows, w, bias)


def _int8_product(rows, q, scale, bias):
    return native.gemv_int8(rows, q, scale, bias)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_the_products_give_a_row_the_same_bits_whatever_shares_it(kind):
    """Batch invariance of the linear layers: each row of a product of 0 to 70 rows (every
    tile height, partial tiles of columns, the few-row stream path and the tiled one) equals,
    bit for bit, the same row computed alone; K with and without a partial last chunk."""
    if not (native.has_gemv() if kind == "bf16" else native.has_gemv_int8()):
        pytest.skip(f"this build has no {kind} product")
    g = torch.Generator().manual_seed(21)
    for n, k in ((37, 576), (130, 1536), (70, 100), (8, 33), (200, 64)):
        x = _rand(70, k, seed=n + k)
        bias = _rand(n, seed=n)
        if kind == "bf16":
            product = functools.partial(_bf16_product, w=_rand(n, k, seed=k), bias=bias)
        else:
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = (torch.rand(n, generator=g) * 0.02 + 0.001).to(BF)
            product = functools.partial(_int8_product, q=q, scale=scale, bias=bias)
        alone = torch.cat([product(x[r : r + 1]) for r in range(70)])
        for m in (0, 2, 3, 4, 5, 6, 7, 8, 9, 17, 70):
            assert torch.equal(product(x[:m]).view(torch.int16), alone[:m].view(torch.int16)), \
                (n, k, m)


def _experts_loop(h, idx, top, gate_up, down):
    """The stated sums of a mixture-of-experts layer, one row and one expert at a time on the
    native products: each expert's output through gemv, SiLU x up and gemv, weighted in
    bf16, added in float32 from zero in ascending expert order, rounded once."""
    out = []
    for t in range(h.shape[0]):
        acc = torch.zeros(1, h.shape[1], dtype=torch.float32)
        for e, c in sorted(zip(idx[t].tolist(), range(idx.shape[1]))):
            y = native.gemv(native.silu_mul(native.gemv(h[t : t + 1], gate_up[e])), down[e])
            acc += (y * top[t : t + 1, c, None]).float()
        out.append(acc.to(h.dtype))
    return torch.cat(out)


@pytest.mark.parametrize("hidden,inter,k", [(64, 96, 2), (72, 40, 3), (576, 768, 2),
                                            (64, 32, 7)])
def test_the_experts_call_gives_the_loops_bits_whatever_shares_it(hidden, inter, k):
    """native.moe_experts (one call a mixture-of-experts layer) against the stated sums
    computed expert by expert, bit for bit, for steps of 1 to 37 rows (each expert's rows on
    the stream and tiled paths, an expert no row chooses, partial chunks when H or inter is
    not a multiple of 32, 2, 3 and 7 experts a token), and each row equal to the same row
    alone."""
    if not native.has_gemv():
        pytest.skip("this build has no bf16 product")
    experts = 8
    gate_up = [_rand(2 * inter, hidden, seed=e, scale=0.2) for e in range(experts)]
    down = [_rand(hidden, inter, seed=50 + e, scale=0.2) for e in range(experts)]
    g = torch.Generator().manual_seed(hidden + inter)
    h = _rand(37, hidden, seed=7)
    idx = torch.stack([torch.randperm(experts - 1, generator=g)[:k] for _ in range(37)])
    top = torch.rand(37, k, generator=g).to(BF)
    gate_up[experts - 1] = down[experts - 1] = None  # the one no row routes to
    table = native.moe_table(gate_up, down)
    alone = torch.cat([native.moe_experts(h[r : r + 1], idx[r : r + 1], top[r : r + 1], table)
                       for r in range(37)])
    for m in (1, 2, 5, 16, 37):
        got = native.moe_experts(h[:m], idx[:m], top[:m], table)
        want = _experts_loop(h[:m], idx[:m], top[:m], gate_up, down)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (m, hidden, inter)
        assert torch.equal(got.view(torch.int16), alone[:m].view(torch.int16)), m
    bad = idx[:1].clone()
    bad[0, -1] = experts - 1
    with pytest.raises(ValueError, match="without weights"):
        native.moe_experts(h[:1], bad, top[:1], table)


def moe_lora_case(hidden, inter, experts, k, layers, layer, segments, seed=0):
    """A mixture layer's experts (bf16) and a step's expert LoRA terms as the native call
    reads them, built by hand: ``segments`` (rows, rank, experts whose gate_up the adapter
    targets, experts whose down it targets), one page of pieces a segment, each piece a rank
    row of one layer: [A gate_up E x H | BT gate_up E x 2I | A down E x I | BT down E x H].
    Returns (h, idx, top, moe table, terms, the tensors a reference reads)."""
    g = torch.Generator().manual_seed(seed)
    i32, num = torch.int32, len(segments)
    starts = [0]
    for rows, *_ in segments:
        starts.append(starts[-1] + rows)
    h_, i_ = hidden, inter
    a_gu, bt_gu = 0, experts * h_
    a_d, bt_d = bt_gu + experts * 2 * i_, bt_gu + experts * 2 * i_ + experts * i_
    elems = bt_d + experts * h_
    per_page = layers * max(1, max(s[1] for s in segments))
    memory = torch.zeros(num, per_page * 2 * elems, dtype=torch.uint8)
    values = memory.view(BF).view(num, per_page, elems)
    values.copy_((torch.randn(num, per_page, elems, generator=g) / 4).to(BF))
    ranks = [torch.zeros(experts, num, dtype=i32) for _ in range(2)]
    for j, (_, r, gate_ups, downs) in enumerate(segments):
        for part, chosen in enumerate((gate_ups, downs)):
            for e in chosen:
                ranks[part][e, j] = r
    table = native.lora_table(torch.tensor(starts, dtype=i32),
                              torch.tensor([s[1] for s in segments], dtype=i32),
                              torch.arange(num + 1, dtype=i32), torch.arange(num, dtype=i32),
                              memory, 2 * elems, 0, [None] * 4,
                              [torch.zeros(p, num, dtype=i32) for p in (3, 1, 2, 1)], layers)
    offsets = [(2 * a_gu, 2 * bt_gu, h_, 2 * i_), (2 * a_d, 2 * bt_d, i_, h_)]
    terms = native.moe_lora(table, [(*o, r) for o, r in zip(offsets, ranks)])
    gate_up = [(torch.randn(2 * i_, h_, generator=g) / h_**0.5).to(BF) for _ in range(experts)]
    down = [(torch.randn(h_, i_, generator=g) / i_**0.5).to(BF) for _ in range(experts)]
    rows = starts[-1]
    h = torch.randn(rows, h_, generator=g).to(BF)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    top = torch.softmax(torch.randn(rows, k, generator=g), -1).to(BF)
    parts = (values, ranks, (a_gu, bt_gu, a_d, bt_d), gate_up, down, (memory, elems, offsets))
    return h, idx, top, native.moe_table(gate_up, down), terms, parts


def test_the_experts_call_adds_each_rows_expert_lora_terms():
    """native.moe_experts with a step's expert LoRA (segments of ranks 1 to 16 on one layer
    of two, an adapter on both groups, on down only, on some experts, a row without an
    adapter): against float64 terms on the call's own base products, within bf16's rounding
    of the sum; rows without terms bit for bit the call without LoRA; each row alone its
    bits in the step."""
    if not native.has_gemv():
        pytest.skip("this build has no bf16 product")
    hidden, inter, experts, k, layer = 96, 48, 6, 2, 1
    segments = [(2, 5, range(6), range(6)), (1, 0, (), ()), (3, 8, (), range(6)),
                (1, 1, (0, 2), ()), (4, 16, range(6), (1, 3))]
    h, idx, top, table, terms, parts = moe_lora_case(hidden, inter, experts, k, 2, layer,
                                                     segments)
    values, ranks, (a_gu, bt_gu, a_d, bt_d), gate_up, down, (memory, elems, offsets) = parts
    got = native.moe_experts(h, idx, top, table, None, terms, layer)
    base = native.moe_experts(h, idx, top, table)
    seg_of = [j for j, s in enumerate(segments) for _ in range(s[0])]
    for t in range(h.shape[0]):
        j, r = seg_of[t], segments[seg_of[t]][1]
        rows = values[j, layer * r : (layer + 1) * r].double()
        acc = torch.zeros(hidden, dtype=torch.float64)
        for e, c in sorted(zip(idx[t].tolist(), range(k))):
            gu = native.gemv(h[t : t + 1], gate_up[e]).double()[0]
            if ranks[0][e, j]:
                a = rows[:, a_gu + e * hidden : a_gu + (e + 1) * hidden]
                gu = gu + (a @ h[t].double()) @ rows[:, bt_gu + e * 2 * inter :
                                                     bt_gu + (e + 1) * 2 * inter]
            mid = native.silu_mul(gu.to(BF)[None])
            y = native.gemv(mid, down[e]).double()[0]
            if ranks[1][e, j]:
                a = rows[:, a_d + e * inter : a_d + (e + 1) * inter]
                y = y + (a @ mid[0].double()) @ rows[:, bt_d + e * hidden : bt_d + (e + 1) * hidden]
            acc += y * top[t, c].double()
        assert (got[t].double() - acc).abs().max() <= 0.02 * acc.abs().max() + 1e-3, t
        touched = any(int(ranks[p][e, j]) for p in (0, 1) for e in idx[t].tolist())
        assert touched or torch.equal(got[t].view(torch.int16), base[t].view(torch.int16)), t
    assert not torch.equal(got, base)
    i32 = torch.int32
    for t in range(h.shape[0]):  # alone: a step of its one row, its segment's page
        j = seg_of[t]
        one = native.lora_table(torch.tensor([0, 1], dtype=i32),
                                torch.tensor([segments[j][1]], dtype=i32),
                                torch.tensor([0, 1], dtype=i32), torch.tensor([j], dtype=i32),
                                memory, 2 * elems, 0, [None] * 4,
                                [torch.zeros(p, 1, dtype=i32) for p in (3, 1, 2, 1)], 2)
        mine = native.moe_lora(one, [(*o, r[:, j : j + 1].contiguous())
                                     for o, r in zip(offsets, ranks)])
        alone = native.moe_experts(h[t : t + 1], idx[t : t + 1], top[t : t + 1], table, None,
                                   mine, layer)
        assert torch.equal(alone.view(torch.int16), got[t : t + 1].view(torch.int16)), t


def test_the_experts_call_on_int8_experts_gives_the_loops_bits():
    """int8 experts (row scales in bf16, as the loader stores them) in one call: the stated
    sums computed expert by expert through native.gemv_int8, bit for bit, 1 to 21 rows."""
    from gpupool.models.loader import quantize_rows

    if not native.has_gemv_int8():
        pytest.skip("this build has no int8 product")
    experts, hidden, inter, k = 6, 96, 80, 3
    g = torch.Generator().manual_seed(8)
    gu = [quantize_rows(torch.randn(2 * inter, hidden, generator=g) * 0.2, BF)
          for _ in range(experts)]
    dn = [quantize_rows(torch.randn(hidden, inter, generator=g) * 0.2, BF)
          for _ in range(experts)]
    table = native.moe_table([w[0] for w in gu], [w[0] for w in dn], [w[1] for w in gu + dn])
    _check_quantized_experts(table, experts, hidden, k, g,
                             lambda x, e: native.gemv_int8(x, *gu[e], None),
                             lambda x, e: native.gemv_int8(x, *dn[e], None))


def _check_quantized_experts(table, experts, hidden, k, g, gate_up, down, swiglu=None):
    """native.moe_experts against the stated sums made expert by expert with ``gate_up(x, e)``
    and ``down(x, e)`` (the quantized products), bit for bit, for 1, 4 and 21 rows (the
    activation SiLU x up, or gpt-oss's SwiGLU with ``swiglu`` = (limit, alpha))."""
    h = _rand(21, hidden, seed=4)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(21)])
    top = torch.rand(21, k, generator=g).to(BF)
    for m in (1, 4, 21):
        want = []
        for t in range(m):
            acc = torch.zeros(1, hidden)
            for e, c in sorted(zip(idx[t].tolist(), range(k))):
                gu = gate_up(h[t : t + 1], e)
                y = down(native.silu_mul(gu) if swiglu is None
                         else native.swiglu_oai(gu, *swiglu), e)
                acc += (y * top[t : t + 1, c, None]).float()
            want.append(acc.to(BF))
        got = native.moe_experts(h[:m], idx[:m], top[:m], table, swiglu)
        assert torch.equal(got.view(torch.int16), torch.cat(want).view(torch.int16)), m


@pytest.mark.parametrize("group,k,codebook", [(32, 2, False), (64, 3, False), (32, 2, True)])
def test_the_experts_call_on_4bit_experts_gives_the_loops_bits(group, k, codebook):
    """4-bit experts (kernels/quant4.py; with a codebook: MXFP4's) in one call: the stated
    sums computed expert by expert through native.gemv_int4, bit for bit, 1 to 21 rows."""
    from gpupool.kernels import quant4

    if not native.has_gemv_int4():
        pytest.skip("this build has no 4-bit product")
    experts, hidden, inter = 6, 128, 192
    g = torch.Generator().manual_seed(group + k)
    gu = [quant4.quantize(torch.randn(2 * inter, hidden, generator=g) * 0.2, group)
          for _ in range(experts)]
    dn = [quant4.quantize(torch.randn(hidden, inter, generator=g) * 0.2, group)
          for _ in range(experts)]
    code = torch.tensor(quant4.E2M1) if codebook else None
    codes = [code] * (2 * experts)
    table = native.moe_table([w[0] for w in gu], [w[0] for w in dn],
                             [w[1] for w in gu + dn], [w[2] for w in gu + dn], codes)
    assert (table.code is not None) == codebook
    _check_quantized_experts(table, experts, hidden, k, g,
                             lambda x, e: native.gemv_int4(x, *gu[e], None, code),
                             lambda x, e: native.gemv_int4(x, *dn[e], None, code))
    if codebook:  # experts of two codebooks (or one without) cannot share the call
        with pytest.raises(ValueError, match="codebooks"):
            native.moe_table([w[0] for w in gu], [w[0] for w in dn], [w[1] for w in gu + dn],
                             [w[2] for w in gu + dn], [None, *codes[1:]])


@pytest.mark.parametrize("k", [576, 1024, 1536, 5000])
@pytest.mark.parametrize("rows", [2, 8])  # the few-row path and the tiled one
def test_gemv_int8_sums_extreme_rows_without_overflow(k, rows):
    """Constant rows at the int8 and int16 extremes (the largest dot products there are:
    6.4e9 for 1536 columns, past int32; a tile's int32 lanes take 512 columns of them): the
    same as the int8 linear."""
    from gpupool.kernels.linear import linear_int8

    if not native.has_gemv_int8():
        pytest.skip("this build has no int8 GEMV (AVX-512 BW or AVX2)")
    x = torch.full((rows, k), 3.0).to(BF)
    x[1::2] = -0.5
    q = torch.full((20, k), 127, dtype=torch.int8)
    q[1::3], q[2::3, ::2] = -128, -128
    scale = torch.full((20,), 0.01).to(BF)
    got, want = native.gemv_int8(x, q, scale), linear_int8(x, q, scale)
    assert _ulps_apart(got, want).max() <= 1, (got, want)


@pytest.mark.parametrize("k", [7, 40, 576])
def test_gemv_int8_rows_with_inf_or_nan_give_nan(k):
    """A row holding inf or NaN has no integer form: its outputs are NaN, the other rows'
    unchanged (every K: the check once missed a NaN in a row shorter than a vector)."""
    if not native.has_gemv_int8():
        pytest.skip("this build has no int8 GEMV (AVX-512 BW or AVX2)")
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (9, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(9, generator=g) * 0.02 + 0.001).to(BF)
    for rows in (3, 8):
        x = _rand(rows, k, seed=k)
        clean = native.gemv_int8(x, q, scale)
        x[0, 0], x[2, k - 1] = float("nan"), float("inf")
        got = native.gemv_int8(x, q, scale)
        assert got[0].isnan().all() and got[2].isnan().all()
        assert torch.equal(got[1], clean[1]) and torch.equal(got[3:], clean[3:])


@pytest.mark.parametrize("vocab", [1, 63, 64, 65, 49152])
def test_argmax_and_finite_rows_match_torch(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab + 3, generator=g)[:, :vocab]  # strided rows
    x[1] = 2.0  # a row of ties: the first index
    x[2, -1] = 50.0  # the largest last
    x[3, vocab // 2] = float("-inf")  # masked values are finite for argmax, not for the check
    x[4, :] = float("-inf")
    x[4, vocab - 1] = -1e30
    assert native.argmax(x) == x.argmax(-1).tolist()
    x[0, vocab // 3] = float("nan")
    x[5, -1] = float("inf")
    want = torch.isfinite(x).all(-1).tolist()
    assert native.finite_rows(x) == want
    assert want[0] is False and want[5] is False and want[3] is False and want[1] is True


@pytest.mark.parametrize("four", [False, True])
def test_the_experts_call_with_biases_and_gpt_oss_swiglu_gives_the_loops_bits(four):
    """gpt-oss's experts in one call: a bias on every product and the clamped SwiGLU (gates
    past the limit), bf16 or MXFP4-like 4-bit experts (the e2m1 codebook): the stated sums
    made expert by expert with the biased products and native.swiglu_oai, bit for bit."""
    from gpupool.kernels import quant4

    if not native.has_gemv_int4():
        pytest.skip("this build has no 4-bit product")
    experts, hidden, inter, k = 6, 96, 64, 2
    g = torch.Generator().manual_seed(11 + four)
    code = torch.tensor(quant4.E2M1)

    def weight(n, kk):  # 4-bit: MXFP4's codes and exponent-byte scales (2^-4 .. 2^1)
        if four:
            return (torch.randint(0, 256, (n, kk // 2), generator=g, dtype=torch.uint8),
                    torch.randint(123, 129, (n, kk // 32), generator=g, dtype=torch.uint8))
        return ((torch.randn(n, kk, generator=g) * 0.6).to(BF),)  # gate_up's reach past 7

    gu = [weight(2 * inter, hidden) for _ in range(experts)]
    dn = [weight(hidden, inter) for _ in range(experts)]
    bias = [_rand(w[0].shape[0], seed=30 + i) for i, w in enumerate(gu + dn)]

    def product(x, w, b):
        if four:
            return native.gemv_int4(x, w[0], w[1], None, b, code)
        return native.gemv(x, w[0], b)

    # 4-bit: MXFP4's, codebook experts without offsets (zero), as the loader stores them
    quant = (([w[1] for w in gu + dn], [None] * 2 * experts, [code] * 2 * experts)
             if four else (None, None, None))
    table = native.moe_table([w[0] for w in gu], [w[0] for w in dn], *quant, bias)
    _check_quantized_experts(table, experts, hidden, k, g,
                             lambda x, e: product(x, gu[e], bias[e]),
                             lambda x, e: product(x, dn[e], bias[experts + e]),
                             swiglu=(7.0, 1.702))


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_swiglu_oai_matches_torch(rows):
    """gpt-oss's clamped SwiGLU: torch's bf16 ops' bits but where the sigmoid's last float
    bit moves a rounding (as SiLU's below); gates and ups past the limit clamped."""
    gu = _rand(rows, 2 * 1536, seed=5, scale=5.0)
    got, want = native.swiglu_oai(gu, 7.0, 1.702), reference.swiglu_oai(gu, 7.0, 1.702)
    ulps = _ulps_apart(got, want)
    assert ulps.max() <= 2 and (ulps == 0).float().mean() >= 0.999
    assert (gu[:, :1536].float() > 7).any() and (gu[:, 1536:].float().abs() > 7).any()


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_silu_mul_matches_torch(rows):
    gu = _rand(rows, 2 * 1536, seed=4, scale=3.0)
    got, want = native.silu_mul(gu), reference.silu_mul(gu)
    ulps = _ulps_apart(got, want)  # exp's last bit may move silu a step, the product two
    assert ulps.max() <= 2 and (ulps == 0).float().mean() >= 0.999


@pytest.mark.parametrize("tokens", [1, 7, 70])  # 70 rows: the threaded branch
def test_rope_kv_rotates_q_and_k_and_writes_only_their_slots(tokens):
    h, kvh, d, bt, pages, layers = 9, 3, 64, 16, 12, 4
    storage = _rand(pages, layers, 2, bt, kvh, d, seed=5)
    before = storage.clone()
    k_cache, v_cache = storage[:, 2, 0], storage[:, 2, 1]  # a strided layer view
    g = torch.Generator().manual_seed(6)
    positions = torch.randperm(pages * bt, generator=g)[:tokens]
    slot_pages, slot_offsets = positions // bt, positions % bt
    cos_sin = _rand(pages * bt, 2, d, seed=7)
    qkv = _rand(tokens, (h + 2 * kvh) * d, seed=8)
    cos, sin = cos_sin[positions, 0:1], cos_sin[positions, 1:2]
    qk_want = reference.apply_rope(qkv[:, : (h + kvh) * d].view(tokens, h + kvh, d), cos, sin)
    v_want = qkv[:, (h + kvh) * d :].view(tokens, kvh, d).clone()
    native.rope_kv(qkv, h, kvh, d, cos_sin, positions, k_cache, v_cache, slot_pages,
                   slot_offsets)
    assert torch.equal(qkv[:, : (h + kvh) * d].view(tokens, h + kvh, d), qk_want)
    expected = before.clone()
    expected[slot_pages, 2, 0, slot_offsets] = qk_want[:, h:]
    expected[slot_pages, 2, 1, slot_offsets] = v_want
    assert torch.equal(storage, expected)  # those slots, and nothing else


@pytest.mark.parametrize("heads,kvh,d", [(9, 3, 64), (8, 8, 128), (16, 2, 64), (4, 1, 32),
                                         (6, 2, 48), (4, 4, 16), (3, 1, 40)])
@pytest.mark.parametrize("lengths", [[1], [5, 40, 17, 64], [700, 3, 260]])
def test_decode_attention_matches_dense_attention(heads, kvh, d, lengths):
    """Against float64 attention on the same bf16 inputs: within a bf16 step or two, and no
    worse than twice the torch decode's error; stale NaN past each sequence never read."""
    block = 16
    k_cache, v_cache, table, dk, dv = _paged(lengths, block, kvh, d, num_pages=80, seed=9)
    k16, v16 = k_cache.to(BF), v_cache.to(BF)
    lens = torch.tensor(lengths, dtype=torch.int32)
    for b, n in enumerate(lengths):  # poison the rest of each sequence's last page
        last = int(table[b, (n - 1) // block])
        k16[last, n % block or block :] = float("nan")
        v16[last, n % block or block :] = float("nan")
    q = _rand(len(lengths), heads, d, seed=10)
    got = native.decode_attention(q.view(len(lengths), heads * d), heads, k16, v16, table,
                                  lens, 0.125).view(len(lengths), heads, d).float()
    torch_decode = (decode.paged_attention_decode if len(lengths) > 1
                    else reference.paged_attention_decode)(q, k16, v16, table, lens, 0.125)
    for b in range(len(lengths)):
        want = _dense_attention(q[b : b + 1].float(), dk[b].to(BF).float(),
                                dv[b].to(BF).float(), 0.125)[0]
        err = (got[b] - want).abs().max()
        torch_err = (torch_decode[b].float() - want).abs().max()
        assert torch.isfinite(got[b]).all()
        assert err <= max(2 * torch_err, 2e-2), (b, err, torch_err)


@pytest.mark.parametrize("exact_in_bf16", [True, False])
def test_lora_kernel_matches_the_segmented_path(exact_in_bf16):
    """The fused LoRA kernel (reading the pieces' bf16 part in place through the page
    tables) against the segmented SGMV path on the same adapters gathered out of their
    pages in float32 (the ground truth) on bf16 activations: adapters scattered over
    shuffled pages, unequal segments, base rows between adapters, adapters of different
    ranks and targets, segments longer than the kernel's 16-row work items. On weights
    that bf16 holds exactly, within bf16 rounding of the sum; on any float32 weights, within
    their own rounding to bf16 (2^-8 of the sum of the terms' magnitudes) and that rounding
    of the sum."""
    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.batch import LoraBatch

    widths = {"hidden": 40, "q": 40, "kv": 8, "inter": 72}
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    specs = {"a": (4, every), "b": (16, ("q_proj", "v_proj", "down_proj")),
             "c": (8, ("q_proj",))}
    paged, tables = lora_pages(widths, specs, torch.Generator().manual_seed(3), mirror=True,
                               exact_in_bf16=exact_in_bf16)
    sizes, size_tables = lora_pages(widths, specs, torch.Generator().manual_seed(3),
                                    exact_in_bf16=exact_in_bf16, transform=torch.abs)
    assert any(len(t) > 1 and t != sorted(t) for t in tables.values())  # scattered pages
    targets = {n: t for n, (_, t) in specs.items()}
    g = torch.Generator().manual_seed(4)
    long = ["c"] * 3 + ["b"] * 37 + [None] * 2 + ["a"] * 17  # segments over 16 rows: shared
    for rows in (["a", "a", "b", "b", "b", "c"], ["a"], [None, "a", "a", None, "c", "c", "c"],
                 long):
        fast = LoraBatch.build(rows, tables, paged, targets, "cpu", NativeOps(), batched=True)
        slow = LoraBatch.build(rows, tables, paged, targets, "cpu", batched=False)
        size = LoraBatch.build(rows, size_tables, sizes, targets, "cpu")
        assert fast.native is not None and slow.native is None
        for group, (fan_in, projs) in GROUPS.items():
            x = torch.randn(len(rows), widths[fan_in], generator=g).to(BF)
            n = sum(widths[f] for _, f in projs)
            base = torch.randn(len(rows), n, generator=g).to(BF)
            got, want = base.clone(), base.clone()
            fast.apply(0, group, x, got)
            slow.apply(0, group, x, want)
            for r, name in enumerate(rows):  # base rows and untargeted columns untouched
                if name is None:
                    assert torch.equal(got[r], base[r])
            assert not torch.equal(want, base)
            if exact_in_bf16:
                assert _ulps_apart(got, want).max() <= 1, group
            else:
                terms = torch.zeros(len(rows), n)
                size.apply(0, group, x.float().abs(), terms)
                gap = (got.float() - want.float()).abs()
                assert (gap <= terms * 2**-8 + want.float().abs() * 2**-8).all(), group
                assert (_ulps_apart(got, want) <= 1).float().mean() >= 0.5, group


def test_the_kernel_reads_pages_wherever_they_lie():
    """The same adapters in pages laid out another way (another shuffle of the pool, other
    page sizes: 1 to 7 pieces a page, and many) give the fused kernel's very bits: a sum over the
    hidden size is one piece's row, its order fixed wherever the piece is."""
    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.batch import LoraBatch

    widths = {"hidden": 40, "q": 40, "kv": 8, "inter": 72}
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    specs = {"a": (4, every), "b": (16, ("q_proj", "v_proj", "down_proj"))}
    rows = ["b"] * 3 + [None] + ["a"] * 20
    outs = []
    for page_bytes in (4096, 3584, 7 * 3584 + 100, 1 << 20):  # a piece: 3584 bytes
        paged, tables = lora_pages(widths, specs, torch.Generator().manual_seed(3),
                                   mirror=True, page_bytes=page_bytes)
        batch = LoraBatch.build(rows, tables, paged, {n: t for n, (_, t) in specs.items()},
                                "cpu", NativeOps(), batched=True)
        g = torch.Generator().manual_seed(4)
        out = []
        for group, (fan_in, projs) in GROUPS.items():
            x = torch.randn(len(rows), widths[fan_in], generator=g).to(BF)
            y = torch.zeros(len(rows), sum(widths[f] for _, f in projs)).to(BF)
            batch.apply(0, group, x, y)
            out.append(y)
        outs.append(out)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_the_lora_mirror_lives_in_kv_pages_and_follows_every_load(tiny_models, tmp_path):
    """A bf16 model on CPU: its float32 pieces' bf16 part lies in pages of the arena's KV
    region; with one device copy at a time and two adapters taking turns, each load leaves
    every piece's bf16 part equal to its float32 part rounded, and an adapter gives the same
    tokens after the other one evicted it."""
    folder = tiny_models("llama")
    a = make_peft_adapter(folder, tmp_path / "a", 4, ["q_proj", "v_proj", "down_proj"], seed=5)
    b = make_peft_adapter(folder, tmp_path / "b", 8, ["o_proj", "gate_proj", "up_proj"],
                          seed=6)
    e = make_engine(folder, dtype="bfloat16", max_lora_rank=8, max_loras_on_device=1)
    try:
        e.add_adapter("a", "m", a)
        e.add_adapter("b", "m", b)
        prompt = random_prompts(1, 6, 6, seed=3)[0]
        greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        worker = e.local.core.workers["m"]
        tokens = []
        arena = e.local.arena
        for name in ("a", "b", "a"):
            tokens.append(list(e.generate([prompt], greedy, model=name)[0].token_ids))
            paged = worker.adapter_pages
            lay = paged.layout
            assert list(paged.resident) == [name] and lay.mirror_offset is not None
            table, ppp = paged._loaded[name], paged.pieces_per_page
            pieces = torch.cat([paged.memory[p, : ppp * lay.piece_bytes].view(ppp, -1)
                                for p in table])[: paged.num_pieces(paged.ranks[name])]
            assert torch.equal(lay.bf16(pieces), lay.main(pieces).to(BF))
            assert lay.main(pieces).abs().sum() > 0
            for p in table:
                row = paged.memory[p]
                assert arena.kv.data_ptr() <= row.data_ptr() < arena.kv.data_ptr() \
                    + arena.kv_bytes
        assert tokens[0] == tokens[2] and tokens[0] != tokens[1]
        e.check_integrity()
    finally:
        e.shutdown()


def _paged_prefill_case(new, ctx, nq, nkv, d, bt=16, seed=0):
    """Random bf16 pages holding each sequence's ctx tokens (NaN everywhere else: stale pages),
    permuted page tables, qkv rows for the new tokens; the args of prefill_attention."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [-(-c // bt) for c in ctx]
    num_pages = sum(pages_per) + 3
    k_cache = torch.full((num_pages, bt, nkv, d), float("nan")).to(BF)
    v_cache = k_cache.clone()
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables = torch.zeros(len(new), max(pages_per), dtype=torch.int32)
    at = 0
    for s, c in enumerate(ctx):
        for t in range(c):
            if t % bt == 0:
                tables[s, t // bt] = perm[at]
                at += 1
            page = int(tables[s, t // bt])
            k_cache[page, t % bt] = torch.randn(nkv, d, generator=g).to(BF)
            v_cache[page, t % bt] = torch.randn(nkv, d, generator=g).to(BF)
    qkv = torch.randn(sum(new), (nq + 2 * nkv) * d + 8, generator=g).to(BF)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return qkv, k_cache, v_cache, tables, cu, torch.tensor(ctx, dtype=torch.int32)


@pytest.mark.parametrize("new,ctx,nq,nkv,d", [
    ([5], [5], 9, 3, 64),                    # SmolLM2's heads
    ([40, 3, 70], [40, 10, 100], 9, 3, 64),  # sequences after cached prefixes
    ([1], [1], 4, 4, 32),
    ([63, 64, 65], [63, 64, 200], 8, 2, 64),  # around the kernel's 64-key blocks
    ([129], [129], 4, 1, 128),
    ([33, 100], [33, 300], 6, 3, 16),
])
def test_prefill_attention_matches_the_reference(new, ctx, nq, nkv, d):
    """native.prefill_attention against float64 on the same bf16 inputs: no further off than
    the torch path (kernels.reference, SDPA) in its largest and mean error; the NaN in pages
    and slots past each context never reaches the output."""
    if native.target() == "native":
        assert native.has_prefill_attention(d) == ("avx512_bf16" in cpu_flags())
    if not native.has_prefill_attention(d):
        pytest.skip("this build has no prefill attention (AVX-512 BF16)")
    qkv, kc, vc, tables, cu, lens = _paged_prefill_case(new, ctx, nq, nkv, d)
    scale = d**-0.5
    t = qkv.shape[0]
    got = native.prefill_attention(qkv, nq, kc, vc, tables, cu, lens, scale)
    q = qkv[:, : nq * d].reshape(t, nq, d)
    theirs = reference.paged_attention_prefill(q, kc, vc, tables, cu, lens, scale)
    exact = reference.paged_attention_prefill(q.double(), kc.double(), vc.double(), tables, cu,
                                              lens, scale)
    assert got is not None and torch.isfinite(got).all()
    err, their = (got.double() - exact.reshape(t, -1)).abs(), (
        theirs.double() - exact).abs().reshape(t, -1)
    assert err.max() <= 1.25 * their.max() + 1e-3, (err.max(), their.max())
    assert err.mean() <= 1.25 * their.mean(), (err.mean(), their.mean())


def _windowed_exact(qkv, nq, kc, vc, tables, cu, lens, scale, window, sinks=None,
                    softcap=0.0):
    """Float64 attention of each new token over its last ``window`` keys (itself included),
    with ``sinks`` [H] (a logit a head beside the scores) or none."""
    t, d, bt = qkv.shape[0], kc.shape[3], kc.shape[1]
    nkv = kc.shape[2]
    out = torch.zeros(t, nq, d, dtype=torch.float64)
    for s in range(len(lens)):
        n, c = int(cu[s + 1] - cu[s]), int(lens[s])
        keys = torch.stack([kc[int(tables[s, j // bt]), j % bt] for j in range(c)]).double()
        vals = torch.stack([vc[int(tables[s, j // bt]), j % bt] for j in range(c)]).double()
        for i in range(n):
            pos, row = c - n + i, int(cu[s]) + i
            lo = max(0, pos - window + 1)
            q = qkv[row, : nq * d].double().view(nkv, nq // nkv, d)
            sc = torch.einsum("ghd,kgd->ghk", q, keys[lo : pos + 1]) * scale
            if softcap:
                sc = torch.tanh(sc / softcap) * softcap
            if sinks is not None:
                sink = sinks.double().view(nkv, nq // nkv, 1)
                p = torch.cat([sc, sink], -1).softmax(-1)[..., :-1]
            else:
                p = sc.softmax(-1)
            out[row] = torch.einsum("ghk,kgd->ghd", p, vals[lo : pos + 1]).reshape(nq, d)
    return out.reshape(t, nq * d)


def _windowed_sdpa(q, kc, vc, tables, cu, lens, scale, window):
    """kernels.reference.paged_attention_prefill's torch SDPA in bf16, its mask windowed."""
    out, bt = torch.empty_like(q), kc.shape[1]
    for s in range(len(lens)):
        lo, hi, c = int(cu[s]), int(cu[s + 1]), int(lens[s])
        idx = [(int(tables[s, j // bt]), j % bt) for j in range(c)]
        k = torch.stack([kc[p, o] for p, o in idx]).transpose(0, 1)[None]  # [1, KVH, L, D]
        v = torch.stack([vc[p, o] for p, o in idx]).transpose(0, 1)[None]
        pos = torch.arange(hi - lo)[:, None] + (c - (hi - lo))
        key = torch.arange(c)[None, :]
        mask = (key <= pos) & (key > pos - window)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1)[None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[lo:hi] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("new,ctx,window", [
    ([200], [200], 37),            # the window starts inside the 64-key blocks
    ([40, 3, 70], [40, 130, 100], 64),
    ([65, 1], [300, 129], 128),     # after a cached prefix longer than the window
    ([5], [5], 16),                # the window covers everything
])
@pytest.mark.parametrize("with_sinks,softcap", [(False, 0.0), (True, 0.0), (False, 1.5)])
def test_windowed_attention_matches_the_reference(new, ctx, window, with_sinks, softcap):
    """Sliding-window attention (each token over its last ``window`` keys): the native prefill
    and decode kernels against float64 on the same bf16 inputs, no further off than torch's
    SDPA in bf16 (windowed) in their largest and mean error; and each token's row the
    same bits whether its sequence's new tokens are one prefill chunk or decode rows one by
    one (a token's attention does not depend on the chunk: batch invariance). With gpt-oss's
    sinks or Gemma 2's soft cap (of 1.5: most scores capped): against float64 with them, no
    further off than SDPA is without."""
    nq, nkv, d = 6, 2, 64
    if not native.has_prefill_attention(d):
        pytest.skip("this build has no prefill attention (AVX-512 BF16 or AVX2)")
    qkv, kc, vc, tables, cu, lens = _paged_prefill_case(new, ctx, nq, nkv, d)
    scale, t = d**-0.5, qkv.shape[0]
    sinks = torch.linspace(-2.0, 3.0, nq) if with_sinks else None
    exact = _windowed_exact(qkv, nq, kc, vc, tables, cu, lens, scale, window, sinks, softcap)
    got = native.prefill_attention(qkv, nq, kc, vc, tables, cu, lens, scale, window, sinks,
                                   softcap)
    assert got is not None and torch.isfinite(got).all()
    theirs = _windowed_sdpa(qkv[:, : nq * d].reshape(t, nq, d), kc, vc, tables, cu, lens,
                            scale, window).reshape(t, -1)
    plain = _windowed_exact(qkv, nq, kc, vc, tables, cu, lens, scale, window)
    err, their = (got.double() - exact).abs(), (theirs.double() - plain).abs()
    assert err.max() <= 1.25 * their.max() + 1e-3, (err.max(), their.max())
    assert err.mean() <= 1.25 * their.mean(), (err.mean(), their.mean())
    # the same tokens as decode rows: row i of sequence s with its context up to itself
    rows, row_tables, row_lens = [], [], []
    for s in range(len(new)):
        for i in range(new[s]):
            rows.append(int(cu[s]) + i)
            row_tables.append(tables[s])
            row_lens.append(ctx[s] - new[s] + i + 1)
    dec = native.decode_attention(qkv[rows], nq, kc, vc, torch.stack(row_tables).contiguous(),
                                  torch.tensor(row_lens, dtype=torch.int32), scale, window,
                                  sinks, softcap)
    assert torch.equal(dec, got[rows])
    # and a window wider than every context is no window
    wide = native.prefill_attention(qkv, nq, kc, vc, tables, cu, lens, scale, max(ctx), sinks,
                                    softcap)
    assert torch.equal(wide, native.prefill_attention(qkv, nq, kc, vc, tables, cu, lens, scale,
                                                      0, sinks, softcap))


def _prefill_logits(engine, ids, chunk):
    """Logits of every position of ``ids`` through the model's prefill path, ``chunk`` tokens a
    step (later chunks attend to the cached prefix)."""
    from gpupool.models.batch import BatchRow

    w = engine.local.core.workers["m"]
    w.make_resident()
    pages, window = _row_pages(engine, w, len(ids))
    try:
        out = []
        for p in range(0, len(ids), chunk):
            row = BatchRow(token_ids=ids[p : p + chunk], start=p, pages=pages, is_decode=False,
                           samples=True, all_logits=True, window_pages=window)
            out.append(w.model.forward(w.batch([row]), w.kv_view))
        return torch.cat(out)
    finally:
        engine.local.kv.pages.free(pages + (window or []))


def _row_pages(engine, w, n: int):
    """Pages for ``n`` tokens of model ``w``: (its pages, its windowed layers' where they
    are a KV group of their own, else None)."""
    pool = engine.local.kv.pages
    pages = pool.allocate(-(-n // w.block_tokens))
    return pages, pool.allocate(-(-n // w.window_group[0])) if w.window_group else None


@pytest.mark.parametrize("chunk", [80, 23])
def test_prefill_on_the_kernels_is_as_close_to_fp32_as_its_torch_path(tiny_models, chunk,
                                                                      monkeypatch):
    """An 80-token prompt's logits at every position, in one step or in chunks over a cached
    prefix: with the native prefill attention no further from fp32 than the torch path (mean
    error within 1.25x, top-1 agreement within 5 points)."""
    folder = tiny_models("llama")
    ids = random_prompts(1, 80, 80, seed=12)[0]
    engine = make_engine(folder, dtype="bfloat16")
    plain = make_engine(folder, dtype="bfloat16", native=False)  # the torch backend
    exact = make_engine(folder, dtype="float32")
    calls = []
    real = native.prefill_attention
    monkeypatch.setattr(native, "prefill_attention", lambda *a: calls.append(1) or real(*a))
    try:
        ref = _prefill_logits(exact, ids, chunk)
        fast = _prefill_logits(engine, ids, chunk)
        assert bool(calls) == native.has_prefill_attention(16)
        n = len(calls)
        slow = _prefill_logits(plain, ids, chunk)
        assert len(calls) == n  # its backend is torch's: never called
    finally:
        engine.shutdown()
        plain.shutdown()
        exact.shutdown()
    assert fast.shape == ref.shape == (80, ref.shape[1])
    err_fast, err_slow = (fast - ref).abs().mean(), (slow - ref).abs().mean()
    assert err_fast <= 1.25 * err_slow, (err_fast, err_slow)
    top1 = [(x.argmax(-1) == ref.argmax(-1)).float().mean() for x in (fast, slow)]
    assert top1[0] >= top1[1] - 0.05, top1


def _teacher_forced_logits(engine, ids):
    """Logits of each position of ``ids`` through the model's decode path, one row a step."""
    from gpupool.models.batch import BatchRow

    w = engine.local.core.workers["m"]
    w.make_resident()
    pages, window = _row_pages(engine, w, len(ids))
    try:
        out = []
        for p in range(len(ids)):
            row = BatchRow(token_ids=[ids[p]], start=p, pages=pages, is_decode=p > 0,
                           samples=True, window_pages=window)
            out.append(w.model.forward(w.batch([row]), w.kv_view))
        return torch.cat(out)
    finally:
        engine.local.kv.pages.free(pages + (window or []))


@pytest.mark.parametrize("variant,quantization", [("llama", None), ("qwen2", None),
                                                  ("llama", "int8"), ("mistral", None),
                                                  ("gemma3", None), ("gemma2", None),
                                                  ("gpt_oss", None), ("olmoe", None)])
def test_model_on_the_kernels_is_as_close_to_fp32_as_its_torch_path(tiny_models, variant,
                                                                       quantization,
                                                                       monkeypatch):
    """Teacher-forced over 40 tokens at batch 1, against the model's fp32 logits: the kernels'
    bf16 logits are no further off than the torch path's (mean error within 1.25x, top-1
    agreement within 5 points). (At batch 1 the torch path runs SDPA, whose rounding differs
    from the kernels', so the two bf16 runs are compared through fp32, not with each other.)"""
    folder = tiny_models(variant)
    ids = random_prompts(1, 40, 40, seed=11)[0]
    engine = make_engine(folder, dtype="bfloat16", quantization=quantization)
    plain = make_engine(folder, dtype="bfloat16", quantization=quantization, native=False)
    exact = make_engine(folder, dtype="float32")
    calls = []
    # the products per op, the attention per op, or every layer in one call
    for name in ("gemv", "decode_attention", "decode_layers"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name,
                            lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    try:
        ref = _teacher_forced_logits(exact, ids)
        fast = _teacher_forced_logits(engine, ids)
        assert calls, "the kernels were not used"
        n = len(calls)
        slow = _teacher_forced_logits(plain, ids)
        assert len(calls) == n  # its backend is torch's: never called
    finally:
        engine.shutdown()
        plain.shutdown()
        exact.shutdown()
    err_fast, err_slow = (fast - ref).abs().mean(), (slow - ref).abs().mean()
    assert err_fast <= 1.25 * err_slow, (err_fast, err_slow)
    top1 = [(x.argmax(-1) == ref.argmax(-1)).float().mean() for x in (fast, slow)]
    assert top1[0] >= top1[1] - 0.05, top1


@pytest.mark.parametrize("variant,quantization,adapters", [
    ("llama", None, False), ("qwen2", None, False), ("llama", "int8", False),
    ("llama", None, True), ("llama", "int8", True), ("llama", "int4", False),
    ("qwen2", "int4", True), ("mistral", None, True), ("qwen2_window", None, True),
    ("qwen3", None, True),  # qwen3: each head's q and k norms in the call
    ("gemma2", None, True), ("gemma3", None, True), ("gemma3_wide", None, False)])
def test_whole_step_call_gives_the_per_op_path_bit_for_bit(tiny_models, variant, quantization,
                                                            adapters, tmp_path, monkeypatch):
    """native.decode_layers (every layer of a small decode step in one call, with the
    embedding and the head, or without) against the per-op native path: identical logits,
    batches of 1 and 3 decode rows (and 8 for int8 weights: their tiled product); with
    adapters, rows of two adapters of different ranks and targets and base rows, the LoRA
    terms inside the call."""
    from gpupool.models.batch import BatchRow

    if quantization and not native.has_gemv_int8():  # int4's head is int8
        pytest.skip("this build has no int8 GEMV (AVX-512 BW or AVX2): no whole-step call for int8")
    folder = tiny_models(variant)
    engine = make_engine(folder, dtype="bfloat16", quantization=quantization, max_lora_rank=8)
    names = [None] * 8
    if adapters:
        engine.add_adapter("a", "m", make_peft_adapter(
            folder, tmp_path / "a", 4, ["q_proj", "v_proj", "down_proj"], seed=5))
        engine.add_adapter("b", "m", make_peft_adapter(
            folder, tmp_path / "b", 8, ["o_proj", "gate_proj", "up_proj", "k_proj"], seed=6))
        names = ["a", "b", "b", "a", "a", None, "b", "b"]
    calls = []
    real = native.decode_layers
    monkeypatch.setattr(native, "decode_layers",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    try:
        w = engine.local.core.workers["m"]
        w.make_resident()
        sizes = (1, 3, 8) if quantization else (1, 3)
        prompts = random_prompts(max(sizes), 5, 9, seed=21)
        pages = [engine.local.kv.pages.allocate(2) for _ in prompts]
        # Qwen2's windowed layer: pages of its own (its KV group's)
        window = [engine.local.kv.pages.allocate(2) if w.window_group else None
                  for _ in prompts]
        rows = [BatchRow(token_ids=p, start=0, pages=pg, is_decode=False, samples=True,
                         window_pages=wp) for p, pg, wp in zip(prompts, pages, window)]
        w.model.forward(w.batch(rows), w.kv_view)
        for n in sizes:
            step = sorted(  # rows grouped by adapter, as the scheduler sends them
                [BatchRow(token_ids=[7 + i], start=len(p), pages=pg, is_decode=True,
                          samples=True, adapter=names[i], window_pages=wp)
                 for i, (p, pg, wp) in enumerate(list(zip(prompts, pages, window))[:n])],
                key=lambda r: r.adapter or "")
            batch = w.batch(step)
            lora = w._lora_batch(step)
            assert (lora is not None) == any(r.adapter for r in step)
            before = len(calls)
            fused = w.model.forward(batch, w.kv_view, lora)  # rewrites the same K/V slots
            assert len(calls) == before + 1 and (calls[-1] is None) == (lora is None)
            cache = w.model.ops._cache  # what the backend made for the whole-step call
            ends = cache.ends
            assert ends  # the embedding and the head ran in the call too
            cache.ends = None  # the layers in the call, the ends in torch and a GEMV
            try:
                layers_only = w.model.forward(batch, w.kv_view, lora)
            finally:
                cache.ends = ends
            table = cache.table
            cache.table = None  # the per-op path
            try:
                per_op = w.model.forward(batch, w.kv_view, lora)
            finally:
                cache.table = table
            assert len(calls) == before + 2
            assert torch.equal(fused, per_op) and torch.equal(layers_only, per_op)
            if lora is not None:  # the adapters' terms are in it
                assert not torch.equal(fused, w.model.forward(batch, w.kv_view))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", ["llama", "qwen3"])  # qwen3: per-head q/k norms
def test_greedy_tokens_on_the_kernels_agree_with_transformers_bf16(tiny_models, variant):
    """The bound test_dtype states for bf16, with the kernels on: first tokens identical, and
    every token one transformers rates within one bf16 rounding of its best, 8 prompts x 12
    greedy tokens, batched decode."""
    folder = tiny_models(variant)
    prompts = random_prompts(8, 4, 16, seed=61)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = make_engine(folder, dtype="bfloat16")
    try:
        ours = [list(o.token_ids) for o in engine.generate(prompts, params)]
    finally:
        engine.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    theirs = hf_greedy_with(hf, prompts, 12)
    assert all(a[0] == b[0] for a, b in zip(ours, theirs))
    assert hf_gap_in_ulps(hf, prompts, ours) <= 1.0


def test_loading_the_kernels_keeps_subnormal_floats(tmp_path):
    """The library is linked without -ffast-math: linked with it, it pulled in crtfastmath.o,
    which turned on flush-to-zero for the whole process when it loaded (subnormals became 0
    in torch and in Python; hypothesis noticed). A fresh process, a fresh build."""
    code = """
import sys, torch
from gpupool.kernels import native
assert native.available()
tiny = sys.float_info.min / 4
print("PYTHON", tiny * 1.0 > 0)
print("TORCH", (torch.tensor([1e-40]) * 1).item() > 0)
"""
    env = {**os.environ, "GPUPOOL_NATIVE_DIR": str(tmp_path / "native")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PYTHON True" in proc.stdout and "TORCH True" in proc.stdout


def test_without_a_compiler_the_torch_path_serves(tiny_models, tmp_path):
    """A process with no C compiler on PATH and an empty kernel cache: the kernels are
    unavailable (said in the log), and a bf16 engine still generates."""
    code = f"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from gpupool.kernels import native
print("AVAILABLE", native.available())
{TESTS_PACKAGE}
from tests.factories import make_engine
from gpupool import SamplingParams
e = make_engine({str(tiny_models("llama"))!r}, dtype="bfloat16")
out = e.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
print("TOKENS", len(out[0].token_ids))
e.shutdown()
"""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable),
           "GPUPOOL_NATIVE_DIR": str(tmp_path / "native")}
    env.pop("CC", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "AVAILABLE False" in proc.stdout
    assert "no C compiler" in proc.stdout
    assert "TOKENS 4" in proc.stdout
