"""4-bit weights (issue 34, item 3): the packed format and its quantization, the native CPU
product and the Triton kernel against the torch reference, batch invariance, and whole models
stored 4-bit against transformers running the same model with the de-quantized weights
(adapters on a 4-bit base: tests/test_quant.py)."""

from __future__ import annotations

import json

import pytest
import torch

from gpupool import SamplingParams
from gpupool.kernels import native, quant4, triton_available
from gpupool.models.batch import BatchRow
from gpupool.models.config import ModelConfig
from gpupool.models.llama import LlamaModel
from gpupool.models.loader import build_layout
from gpupool.models.runner import build_batch
from gpupool.pool.weights import GOFFSET_SUFFIX, GSCALE_SUFFIX
from tests.factories import hf_greedy, make_engine, make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = [[1, 5, 9, 23, 44, 2, 17], [3, 4, 5, 6]]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
needs_native = pytest.mark.skipif(not (native.available() and native.has_gemv_int4()),
                                  reason="the native 4-bit product is not built on this CPU")


def test_pack_puts_a_blocks_columns_in_its_low_then_high_nibbles():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    q[0, 40] = 9
    p = quant4.pack(q)
    assert p.shape == (1, 32)
    # byte j of block b: column 32 b + j low, 32 b + 16 + j high
    for b in range(2):
        for j in range(16):
            byte = int(p[0, 16 * b + j])
            assert byte & 15 == int(q[0, 32 * b + j]) and byte >> 4 == int(q[0, 32 * b + 16 + j])
    assert torch.equal(quant4.unpack(p), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant4.pack(torch.zeros(2, 48, dtype=torch.uint8))


def test_quantize_is_within_half_a_step_of_every_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g) * torch.logspace(-3, 2, 6)[:, None]
    w[2, 32:64] = 0.7  # a constant group
    for group in quant4.GROUPS:
        q, s, o = quant4.quantize(w, group)
        assert q.dtype == torch.uint8 and q.shape == (6, 128)
        assert s.shape == o.shape == (6, 256 // group) and s.dtype == o.dtype == torch.float32
        err = (quant4.dequantize(q, s, o) - w).abs().view(6, -1, group)
        assert bool((err <= s[:, :, None] * 0.5001 + 1e-6).all()), group
    q, s, o = quant4.quantize(w, 32)
    assert bool((quant4.dequantize(q, s, o)[2, 32:64] == 0.7).all())
    rows = torch.tensor([4, 1, 4])
    assert torch.equal(quant4.dequantize(q, s, o, rows), quant4.dequantize(q, s, o)[rows])


def test_the_layout_stores_linear_weights_4bit_with_group_scales(tmp_path):
    cfg = ModelConfig.from_folder(make_tiny_model(tmp_path / "m", "llama"))
    dense = build_layout(cfg, torch.bfloat16)
    lay = build_layout(cfg, torch.bfloat16, "int4-g128")
    assert lay.num_bytes < dense.num_bytes * 0.5
    views = lay.views(lay.allocate())
    h = cfg.hidden_size  # 64: 128 does not divide it, so its weights take groups of 32
    assert views["layers.0.qkv_weight"].dtype == torch.uint8
    assert views["layers.0.qkv_weight"].shape == (cfg.q_size + 2 * cfg.kv_size, h // 2)
    rows = cfg.q_size + 2 * cfg.kv_size
    assert views["layers.0.qkv_weight" + GSCALE_SUFFIX].shape == (rows, h // 32)
    inter = cfg.intermediate_size  # 128: one group a row
    assert views["layers.1.down_weight" + GOFFSET_SUFFIX].shape == (h, inter // 128)
    assert views["lm_head"].dtype == torch.int8  # the head int8, as llama.cpp keeps it wider
    assert views["lm_head_scale"].shape == (cfg.vocab_size,)
    assert views["embed_tokens"].dtype == torch.bfloat16  # untied: an embedding
    g32 = build_layout(cfg, torch.bfloat16, "int4")  # groups of 32
    g32 = g32.views(g32.allocate())
    assert g32["layers.1.down_weight" + GSCALE_SUFFIX].shape == (h, inter // 32)
    with pytest.raises(ValueError, match="quantization"):
        build_layout(cfg, torch.float32, "int3")


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 37])
@pytest.mark.parametrize("n,k,group", [(40, 64, 32), (70, 576, 32), (33, 256, 128),
                                       (21, 96, 32), (18, 192, 64),  # a lone last block
                                       (13, 192, 96), (11, 480, 480), (9, 320, 160)])
def test_native_int4_matches_the_reference_and_is_batch_invariant(rows, n, k, group):
    g = torch.Generator().manual_seed(rows * 7 + k)
    q, s, o = quant4.quantize(torch.randn(n, k, generator=g), group)
    x = torch.randn(rows, k + 8, generator=g).to(torch.bfloat16)[:, :k]  # strided rows
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    e2m1 = torch.tensor(quant4.E2M1)  # a codebook: MXFP4's values
    for b, code in ((None, None), (bias, None), (bias, e2m1)):
        got = native.gemv_int4(x, q, s, o, b, code)
        want = quant4.linear_int4_reference(x, q, s, o, b, code=code)
        # the same sums in another order: a bf16 rounding step at most
        assert ((got.float() - want.float()).abs()
                <= 1e-2 * (1 + want.float().abs())).all(), (rows, n, k)
        alone = torch.cat([native.gemv_int4(x[i : i + 1], q, s, o, b, code)
                           for i in range(rows)])
        assert torch.equal(alone, got)  # a row's bits do not depend on its batch
    # no offsets (a codebook weight's: zero): the bits of zero offsets
    zero = torch.zeros_like(o)
    assert torch.equal(native.gemv_int4(x, q, s, None, bias, e2m1),
                       native.gemv_int4(x, q, s, zero, bias, e2m1))
    # MXFP4's scales: exponent bytes (0: the subnormal 2^-127 flushed as the kernel's DAZ
    # does: not among these), the bits of their float32 values
    e8 = torch.randint(118, 134, s.shape, generator=g, dtype=torch.uint8)
    assert torch.equal(native.gemv_int4(x, q, e8, None, bias, e2m1),
                       native.gemv_int4(x, q, quant4.scale_values(e8), None, bias, e2m1))
    want = quant4.linear_int4_reference(x, q, e8, None, bias, code=e2m1)
    got = native.gemv_int4(x, q, e8, None, bias, e2m1)
    assert ((got.float() - want.float()).abs() <= 1e-2 * (1 + want.float().abs())).all()
    with pytest.raises(ValueError, match="fit"):
        native.gemv_int4(x, q, s[:-1].contiguous(), o[:-1].contiguous())


def test_the_avx2_int4_product_is_bit_identical_to_this_cpus(tmp_path, monkeypatch):
    """The AVX2 build (``-march=x86-64-v3``, what most users' CPUs run), the AVX-512 build
    without BF16 (Skylake, where this CPU runs it) and this CPU's own give the same bits, so
    any continues another's request exactly."""
    from gpupool.models.cpu import cpu_flags

    if not {"avx2", "fma"} <= set(cpu_flags()) or native._compiler() is None:
        pytest.skip("this CPU cannot run the AVX2 build, or there is no C compiler")
    if not native.has_gemv_int4():
        pytest.skip("no native 4-bit product on this CPU")
    monkeypatch.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path))
    libs = [native.open_library(native.build("x86-64-v3")), native._lib()]
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(cpu_flags()):
        libs.append(native.open_library(native.build("skylake-avx512")))
    assert all(lib.gp_gemv_features() & 16 for lib in libs)
    g = torch.Generator().manual_seed(3)
    for rows, n, k, group in ((1, 70, 576, 32), (3, 33, 256, 128), (9, 40, 64, 32),
                              (2, 21, 96, 32), (5, 18, 192, 64), (1, 9, 1536, 32),
                              (3, 13, 192, 96), (2, 11, 480, 480), (1, 9, 320, 160)):
        q, s, o = quant4.quantize(torch.randn(n, k, generator=g), group)
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        e8 = torch.randint(118, 134, s.shape, generator=g, dtype=torch.uint8)
        # values 0..15; MXFP4's codebook; MXFP4's (exponent-byte scales, no offsets)
        for code, sc, off in ((None, s, o), (torch.tensor(quant4.E2M1), s, o),
                              (torch.tensor(quant4.E2M1), e8, None)):
            ys = []
            for lib in libs:
                y = torch.empty(rows, n, dtype=torch.bfloat16)
                lib.gp_gemv_int4(x.data_ptr(), rows, k, k, q.data_ptr(), n, k // 2,
                                 sc.data_ptr(), int(sc.dtype == torch.uint8),
                                 None if off is None else off.data_ptr(), group,
                                 None if code is None else code.data_ptr(), bias.data_ptr(),
                                 y.data_ptr(), n, 2)
                ys.append(y.view(torch.int16))
            assert all(torch.equal(ys[0], y) for y in ys[1:]), (rows, n, k, code is None)


def _twin(folder, dest, group: int):
    """``folder``'s model with each weight gpupool stores 4-bit (int8: the head) replaced by
    its de-quantized float32 values (quantized alone, as the loader quantizes each checkpoint
    tensor)."""
    from safetensors.torch import load_file, save_file

    from gpupool.models.loader import quantize_rows

    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    head = "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
    out = {}
    for name, t in tensors.items():
        if name == head:
            q, s = quantize_rows(t, torch.float32)
            t = q.float() * s[:, None]
        elif t.dim() == 2 and name.split(".")[-2] in LINEAR:
            g = quant4.choose_group(t.shape[1], group)
            t = quant4.dequantize(*quant4.quantize(t, g))
        out[name] = t.float().contiguous()
    dest.mkdir()
    for f in ("config.json", "generation_config.json"):
        if (folder / f).exists():
            (dest / f).write_text((folder / f).read_text())
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("variant,quant", [("llama", "int4-g128"), ("qwen2", "int4")])
def test_a_4bit_model_is_token_exact_with_transformers_on_its_dequantized_weights(
        tmp_path, variant, quant):
    """fp32: an int4 model's greedy tokens are transformers' on the same model whose weights
    are the 4-bit values' float32 meaning (llama: untied, groups of 128 and 32; qwen2: tied,
    so the embedding reads the head's int8 rows, and a qkv bias)."""
    folder = make_tiny_model(tmp_path / variant, variant)
    twin = _twin(folder, tmp_path / "twin", 128 if quant == "int4-g128" else 32)
    engine = make_engine(folder, "q", quantization=quant)
    try:
        got = [list(o.token_ids) for o in engine.generate(PROMPTS, GREEDY, model="q")]
        assert got == hf_greedy(twin, PROMPTS, 8)
        assert engine.stats()["models"]["q"]["quantization"] == quant
        plain = make_engine(folder, "p")
        try:  # the quantization changed something (else the comparison proves nothing)
            worker, pw = engine.local.core.workers["q"], plain.local.core.workers["p"]
            worker.make_resident()
            pw.make_resident()
            batch = build_batch(_rows(), worker.block_tokens, worker.device)
            diff = (worker.model.forward(batch, worker.kv_view)
                    - pw.model.forward(batch, pw.kv_view)).abs().max()
            assert diff > 1e-3
        finally:
            plain.shutdown()
    finally:
        engine.shutdown()


def _rows(adapter=None) -> list[BatchRow]:
    return [BatchRow(token_ids=p, start=0, pages=[1 + 2 * i, 2 + 2 * i], is_decode=False,
                     samples=True, adapter=adapter) for i, p in enumerate(PROMPTS)]


@needs_native
def test_a_bf16_4bit_model_on_the_native_product_gives_a_request_the_same_tokens_in_any_batch(
        tmp_path):
    """bf16 on the native kernels: the 4-bit products run natively, and a request's greedy
    tokens alone equal its tokens beside others (batch invariance); a 4-bit and a bf16 model
    take turns in a weight region that holds one and keep their tokens."""
    folder = make_tiny_model(tmp_path / "m", "llama")
    dense = build_layout(ModelConfig.from_folder(folder), torch.bfloat16).num_bytes
    engine = make_engine(dtype="bfloat16", weight_bytes=dense + 4096, prefetch=False)
    try:
        engine.add_model("q", folder, quantization="int4")
        engine.add_model("b", folder)
        worker = engine.local.core.workers["q"]
        assert type(worker.model.ops).__name__ == "NativeOps"
        prompts = PROMPTS + [[7, 8, 9, 10, 11, 12], [2] * 9]
        together = [o.token_ids for o in engine.generate(prompts, GREEDY, model="q")]
        alone = [engine.generate([p], GREEDY, model="q")[0].token_ids for p in prompts]
        assert together == alone
        assert worker.model.int4 and worker.model.ops.batch_invariant
        engine.generate(PROMPTS, GREEDY, model="b")  # evicts q
        again = [o.token_ids for o in engine.generate(prompts, GREEDY, model="q")]
        assert again == together
        q_bytes = engine.stats()["models"]["q"]["weight_bytes"]
        assert q_bytes < 0.5 * dense
    finally:
        engine.shutdown()


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("rows", [1, 17, 70])  # each tile shape of kernels.int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 dot
def test_triton_int4_matches_its_reference(rows, dtype):
    """The Triton kernel (interpreted on CPU) against the reference, N not a multiple of the
    tile, groups of 64, a bias and without."""
    from gpupool.kernels import int4 as tk

    g = torch.Generator().manual_seed(rows)
    n, k = 72, 192
    q, s, o = quant4.quantize(torch.randn(n, k, generator=g), 64)
    bias = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(rows, k, generator=g) / 4).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    e2m1 = torch.tensor(quant4.E2M1)
    e8 = torch.randint(120, 130, s.shape, generator=g, dtype=torch.uint8)  # MXFP4's scales
    for b, code, sc, off in ((None, None, s, o), (bias, None, s, o), (bias, e2m1, s, o),
                             (bias, e2m1, s, None), (bias, e2m1, e8, None)):
        got = tk.linear_int4(x, q, sc, off, b, code)
        want = x.double() @ quant4.dequantize(q, sc, off, code=code).double().T
        want = want if b is None else want + b.double()
        assert got.dtype == dtype and got.shape == (rows, n)
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), (rows, dtype)
    with pytest.raises(ValueError, match="uint8"):
        tk.linear_int4(x, q.float(), s, o)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_int4_on_gpu(rows, dtype):
    """Compiled for real, against the float64 product of the de-quantized weight."""
    from gpupool.kernels import int4 as tk

    g = torch.Generator().manual_seed(rows)
    q, s, o = quant4.quantize(torch.randn(960, 576, generator=g), 32)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    exact = x.double() @ quant4.dequantize(q, s, o).double().T
    got = tk.linear_int4(x.cuda(), q.cuda(), s.cuda(), o.cuda()).cpu()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()


# ---- 4-bit checkpoints: GPTQ and AWQ, written here from their published layouts -------------
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed eight holds column AWQ_ORDER[i]


def _int32(v: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 (two's complement)."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def _pack8(v: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit values along ``dim`` a word: nibble i holds element ``order[i]``."""
    v = v.movedim(dim, -1).long()
    v = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)]
    words = (v << (4 * torch.arange(8))).sum(-1)
    return _int32(words).movedim(-1, dim).contiguous()


def _quantize_groups(w: torch.Tensor, cols: list[torch.Tensor], sym: bool):
    """w [N, K]: per group (its columns ``cols[g]``) fp16 scales and integer zeros [G, N],
    the values q [K, N] and the de-quantized weight [N, K] ``(q - z) * s``."""
    n, k = w.shape
    q = torch.zeros(k, n, dtype=torch.long)
    s = torch.zeros(len(cols), n, dtype=torch.float16)
    z = torch.zeros(len(cols), n, dtype=torch.long)
    deq = torch.zeros(n, k)
    for g, c in enumerate(cols):
        wg = w[:, c]
        if sym:
            sg = (wg.abs().amax(1) / 7).half()
            zg = torch.full((n,), 8)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            sg = ((hi - lo) / 15).half()
            zg = torch.round(-lo / sg.float()).long().clamp(0, 15)
        qg = (torch.round(wg / sg.float()[:, None]).long() + zg[:, None]).clamp(0, 15)
        q[c] = qg.T
        s[g], z[g] = sg, zg
        deq[:, c] = (qg - zg[:, None]).float() * sg.float()[:, None]
    return q, s, z, deq


def _write_quantized(folder, dest, twin_dest, method: str, group: int, sym: bool = False,
                     act_order: bool = False, fmt: str = "gptq", seed: int = 0,
                     shared_orders: bool = True):
    """``folder``'s model as a GPTQ or AWQ checkpoint in ``dest`` (every linear layer 4-bit,
    the embedding and lm_head float) and its de-quantized twin in ``twin_dest``."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    out, twin, orders = {}, {}, {}
    for name, t in tensors.items():
        kind = name.split(".")[-2]
        if t.dim() != 2 or kind not in LINEAR:
            out[name] = twin[name] = t.float().contiguous()
            continue
        n, k = t.shape
        base = name[: -len(".weight")]
        # GPTQ's act-order: one column order per input (q, k, v share theirs; gate, up too)
        shared = name.rsplit(".", 2)[0] + {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                                           "gate_proj": "gu", "up_proj": "gu"}.get(kind, kind)
        if not shared_orders:
            shared = name
        perm = orders.setdefault(shared, torch.randperm(k, generator=g) if act_order
                                 else torch.arange(k))
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
        cols = [torch.where(g_idx == i)[0] for i in range(k // group)]
        q, s, z, deq = _quantize_groups(t.float(), cols, sym)
        twin[name] = deq
        if method == "gptq":
            out[base + ".qweight"] = _pack8(q, 0)  # [K / 8, N]
            out[base + ".qzeros"] = _pack8(z - (1 if fmt == "gptq" else 0), 1)
            out[base + ".scales"] = s
            out[base + ".g_idx"] = g_idx
        else:
            out[base + ".qweight"] = _pack8(q, 1, AWQ_ORDER)  # [K, N / 8]
            out[base + ".qzeros"] = _pack8(z, 1, AWQ_ORDER)
            out[base + ".scales"] = s
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym,
           "desc_act": act_order, "checkpoint_format": fmt} if method == "gptq"
          else {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm",
                "zero_point": True})
    for d, weights, extra in ((dest, out, {"quantization_config": qc}), (twin_dest, twin, {})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return dest, twin_dest


@pytest.mark.parametrize("method,group,sym,act_order,fmt", [
    ("gptq", 32, False, False, "gptq"),   # asymmetric, zeros stored minus 1 (v1)
    ("gptq", 64, True, True, "gptq"),     # symmetric, act-order: scattered groups
    ("gptq", 32, False, True, "gptq_v2"),  # zeros as they are
    ("awq", 32, False, False, None),
])
def test_gptq_and_awq_checkpoints_load_4bit_and_match_transformers(tmp_path, method, group,
                                                                   sym, act_order, fmt):
    """fp32: greedy tokens of the checkpoint loaded 4-bit (no float copy of its weights) are
    transformers' on the float model of its de-quantized values; the layout keeps them 4-bit
    with the checkpoint's groups."""
    folder = make_tiny_model(tmp_path / "m", "llama")
    ckpt, twin = _write_quantized(folder, tmp_path / "q", tmp_path / "twin", method, group,
                                  sym, act_order, fmt or "gptq")
    engine = make_engine(ckpt, "q")
    try:
        got = [list(o.token_ids) for o in engine.generate(PROMPTS, GREEDY, model="q")]
        assert got == hf_greedy(twin, PROMPTS, 8)
        w = engine.local.core.workers["q"]
        w.make_resident()
        views = w.model.w
        assert views["layers.0.qkv_weight"].dtype == torch.uint8
        assert views["layers.1.down_weight" + GSCALE_SUFFIX].shape[1] == 128 // group
        assert views["lm_head"].dtype == torch.float32  # left float by the checkpoint
        assert ("layers.0.qkv_weight_perm" in views) == act_order
    finally:
        engine.shutdown()


def test_act_order_projections_fused_with_other_orders_are_refused(tmp_path):
    from gpupool.models.errors import ModelLoadError

    folder = make_tiny_model(tmp_path / "m", "llama")
    ckpt, _ = _write_quantized(folder, tmp_path / "q", tmp_path / "twin", "gptq", 32,
                               act_order=True, shared_orders=False)
    engine = make_engine()
    try:
        with pytest.raises(ModelLoadError, match="orders its input columns otherwise"):
            engine.add_model("q", ckpt)
        assert "q" not in engine.stats()["models"]
    finally:
        engine.shutdown()


def test_other_quantized_checkpoints_are_refused_by_name(tmp_path):
    from gpupool.models.errors import ModelLoadError

    folder = make_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    for qc, match in (({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
                      ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "8 bits"),
                      ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv")):
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
        with pytest.raises(ModelLoadError, match=match):
            ModelConfig.from_folder(folder)


# ---- GGUF Q4_0 and Q4_K_M: repacked, not de-quantized ---------------------------------------
def _random_blocks(qtype, rows: int, cols: int, g: torch.Generator):
    """Random valid Q4_K or Q6_K bytes [rows, bytes a row] (the gguf package cannot quantize
    to them): float16 super-block scales near 1e-3, every other byte random."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = torch.randint(0, 256, (nb, nbytes), generator=g, dtype=torch.uint8).numpy()
    scale = (torch.rand(nb, 2, generator=g) * 2e-3 + 5e-4).numpy().astype(np.float16)
    if qtype == GGMLQuantizationType.Q4_K:  # d, dmin lead the block
        raw[:, :4] = scale.view(np.uint8)
    else:  # Q6_K: d ends it
        raw[:, -2:] = scale[:, :1].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_gguf_4bit_tensors_repack_to_their_exact_values(qtype):
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    from gpupool.models.gguf import INT4_TYPES

    g = torch.Generator().manual_seed(5)
    t = getattr(GGMLQuantizationType, qtype)
    rows, cols = 6, 512
    packed = (quantize(torch.randn(rows, cols, generator=g).numpy(), t) if qtype == "Q4_0"
              else _random_blocks(t, rows, cols, g))
    want = dequantize(packed, t).reshape(rows, cols).astype(np.float32)
    q, s, o = INT4_TYPES[qtype](packed, rows, cols)
    assert q.dtype == torch.uint8 and s.shape == (rows, cols // 32)
    assert torch.equal(quant4.dequantize(q, s, o), torch.from_numpy(want))  # bit for bit


def test_a_q4_k_m_gguf_loads_4bit_and_matches_transformers(tmp_path):
    """A Q4_K_M-like file (Q4_K weights, some Q6_K ones as llama.cpp mixes them, Q4_0 and F32
    besides) converts with its 4-bit tensors repacked and the rest de-quantized; fp32 greedy
    tokens equal transformers' on the file's exact float values; the repacked weights stay
    4-bit in the pool, a fused weight with a Q6_K part is stored float."""
    import numpy as np
    import transformers
    from gguf import GGMLQuantizationType, GGUFWriter, dequantize, quantize
    from safetensors.torch import save_file

    from gpupool.models.gguf import unpermute_rows
    from tests.test_quant import _gguf_name, _permute_rows

    cfg = transformers.LlamaConfig(
        vocab_size=160, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=2, bos_token_id=1, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    tensors = {k: v.detach().float() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "tiny.Q4_K_M.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(160)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads = {"q_proj": 4, "k_proj": 2}
    twin, types = {}, {}
    for name, t in tensors.items():
        a = t.numpy()
        kind = name.split(".")[-2]
        if a.ndim == 1 or name == "model.embed_tokens.weight":
            twin[name] = t
            w.add_tensor(_gguf_name(name), a)
            continue
        qtype = (GGMLQuantizationType.Q6_K if kind in ("v_proj", "down_proj") and ".0." in name
                 else GGMLQuantizationType.Q4_0 if kind == "o_proj"
                 else GGMLQuantizationType.Q4_K)
        types[name] = qtype.name
        if qtype == GGMLQuantizationType.Q4_0:
            file_rows = _permute_rows(a, heads[kind]) if kind in heads else a
            packed = quantize(np.ascontiguousarray(file_rows), qtype)
        else:
            packed = _random_blocks(qtype, *a.shape, g)
        values = dequantize(packed, qtype).reshape(a.shape).astype(np.float32)
        if kind in heads:
            values = unpermute_rows(values, heads[kind])
        twin[name] = torch.from_numpy(np.ascontiguousarray(values))
        w.add_tensor(_gguf_name(name), packed, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "config.json").write_text((folder / "config.json").read_text())
    save_file(twin, str(tmp_path / "twin" / "model.safetensors"), metadata={"format": "pt"})

    engine = make_engine(home=tmp_path / "home")
    try:
        engine.add_model("g", path)
        got = [list(o.token_ids) for o in engine.generate(PROMPTS, GREEDY, model="g")]
        assert got == hf_greedy(tmp_path / "twin", PROMPTS, 8)
        worker = engine.local.core.workers["g"]
        worker.make_resident()
        views = worker.model.w
        assert views["layers.1.qkv_weight"].dtype == torch.uint8  # Q4_K q, k, v
        assert views["layers.0.qkv_weight"].dtype == torch.float32  # a Q6_K v among them
        assert views["layers.0.o_weight"].dtype == torch.uint8  # Q4_0
        assert views["layers.0.down_weight"].dtype == torch.float32  # Q6_K
        assert views["lm_head"].dtype == torch.uint8
        converted = next((engine.config.home / "models").glob("tiny.Q4_K_M-*"))
        cfg_json = json.loads((converted / "config.json").read_text())
        assert cfg_json["quantization_config"]["quant_method"] == "gpupool_int4"
    finally:
        engine.shutdown()


def test_the_gateways_size_check_counts_a_4bit_checkpoint_as_4bit(tmp_path):
    """A GPTQ folder's packed values count as the weights they hold, at 0.75 byte each (its
    safetensors header alone: no torch, no weights read)."""
    from gpupool.models.sizes import checkpoint_element_bytes, parameter_count

    folder = make_tiny_model(tmp_path / "m", "llama")
    ckpt, twin = _write_quantized(folder, tmp_path / "q", tmp_path / "twin", "gptq", 32)
    assert parameter_count(ckpt) == parameter_count(twin) == parameter_count(folder)
    assert checkpoint_element_bytes(ckpt) == 0.75 and checkpoint_element_bytes(folder) == 0


def test_a_tied_4bit_embedding_reads_its_rows_values(tmp_path):
    """A checkpoint whose tied embedding is 4-bit (a GGUF's Q4_K token_embd): the embedding
    of a token is its row's float32 values in the model's dtype."""
    cfg = ModelConfig.from_folder(make_tiny_model(tmp_path / "m", "qwen2"))
    assert cfg.tie_word_embeddings
    lay = build_layout(cfg, torch.float32, None, {"embed_tokens": 32})
    views = lay.views(lay.allocate())
    for v in views.values():
        if v.is_floating_point():
            v.normal_()
    w = torch.randn(cfg.vocab_size, cfg.hidden_size)
    q, s, o = quant4.quantize(w, 32)
    views["embed_tokens"].copy_(q)
    views["embed_tokens" + GSCALE_SUFFIX].copy_(s)
    views["embed_tokens" + GOFFSET_SUFFIX].copy_(o)
    model = LlamaModel(cfg, torch.float32, torch.device("cpu"))
    model.bind(views)
    ids = torch.tensor([3, 0, 3, cfg.vocab_size - 1])
    assert model.int4 and torch.equal(model.embed(ids), quant4.dequantize(q, s, o)[ids])
