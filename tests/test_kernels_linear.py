"""kernels.linear agrees with F.linear on every path (oneDNN on CPU, fallback)."""

import pytest
import torch
import torch.nn.functional as F

from gpupool.kernels import linear as lin

TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("m", [1, 7, 64])  # 7 and 64 rows cross the oneDNN size threshold
def test_linear_matches_f_linear_on_flat_buffer_views(onednn, m, dtype):
    """oneDNN where it works for the dtype on this CPU (bf16 needs avx512 or AMX), else the
    F.linear fallback: either way the same values as a float64 product."""
    lin.use_onednn(None if onednn else False)
    try:
        g = torch.Generator().manual_seed(m)
        buf = torch.randn(40_000, generator=g).to(dtype)
        w = buf[123 : 123 + 256 * 96].view(256, 96)  # a view at an odd offset, like weights
        b = torch.randn(256, generator=g).to(dtype)
        x = torch.randn(m, 96, generator=g).to(dtype)
        want = F.linear(x.double(), w.double(), b.double())
        tol = TOL[dtype]
        got = lin.linear(x, w, b)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(lin.linear(x, w).double(), want - b.double(), rtol=tol,
                                   atol=tol * 10)
    finally:
        lin.use_onednn(None)


def test_bf16_without_a_onednn_bf16_kernel_computes_in_fp32(monkeypatch):
    """A CPU whose oneDNN has no bf16 kernel (AVX2 machines; here the probe's answer is set
    so): bf16 products of oneDNN's size widen to fp32 for its fp32 kernel and round once,
    within a bf16 step of the float64 product; tiny ones stay F.linear."""
    lin.use_onednn(None)
    if not lin._onednn_ok(torch.float32):
        pytest.skip("no oneDNN fp32 linear on this CPU")
    monkeypatch.setitem(lin._STATE, torch.bfloat16, False)
    g = torch.Generator().manual_seed(5)
    x, w = (torch.randn(s, generator=g).to(torch.bfloat16) for s in ((16, 576), (1536, 576)))
    b = torch.randn(1536, generator=g).to(torch.bfloat16)
    got = lin.linear(x, w, b)
    want = lin.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    exact = F.linear(x.double(), w.double(), b.double())
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    tiny = x[:1, :8], w[:4, :8]
    assert torch.equal(lin.linear(*tiny), F.linear(*tiny))


def test_other_dtypes_fall_back_to_f_linear():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))


def test_packed_bf16_weights_give_bit_identical_products_and_models(tiny_models):
    """Where this CPU packs bf16 weights for oneDNN (probed), a packed weight's products equal
    the plain weight's bit for bit, and a bf16 model bound with packed weights gives the same
    logits as one without; fp32 and int8 weights are never packed."""
    from gpupool.models.batch import BatchRow
    from gpupool.models.loaded import LoadedModel
    from gpupool.pool.kv import KVStorage

    w = torch.randn(200, 64).to(torch.bfloat16)
    packed = lin.pack(w)
    if packed is None:
        assert not lin._pack_ok(torch.bfloat16)  # this CPU does not pack: nothing to compare
    else:
        assert packed.is_mkldnn and packed.shape == w.shape
        for m in (1, 3, 17, 90):
            x = torch.randn(m, 64).to(torch.bfloat16)
            assert torch.equal(lin.linear(x, packed), lin.linear(x, w))
    assert lin.pack(w.float()) is None
    folder = tiny_models("llama")
    kv = KVStorage(16, 16 << 10, torch.device("cpu"))
    logits = {}
    for packing in (True, False):
        lin.use_packing(None if packing else False)
        try:
            # the torch backend's fast path: the native and the fixed-order products read
            # the plain weights, never pack
            worker = LoadedModel("m", folder, torch.device("cpu"), kv, dtype="bfloat16",
                                 use_native=False, batch_invariant=False)
            assert not worker.model.layers[0]["qkv_weight"].is_mkldnn  # packed only later
            worker.model.pack_weights()
            weights = worker.model.layers[0]["qkv_weight"]
            assert weights.is_mkldnn == (packing and packed is not None)
            logits[packing] = worker.execute([BatchRow([5, 6, 7], 0, [0], False, True)])
        finally:
            lin.use_packing(None)
    assert torch.equal(logits[True], logits[False])
    for dtype, quant in (("float32", None), ("bfloat16", "int8")):
        worker = LoadedModel("m", folder, torch.device("cpu"), kv, dtype=dtype,
                             quantization=quant)
        worker.model.pack_weights()
        assert not any(v.is_mkldnn for lw in worker.model.layers for v in lw.values())


def test_an_evicted_model_lets_go_of_its_weights(tiny_models):
    """The weight pool tells a model when its slab is taken: it drops its views and packed
    copies (host memory), and gets them back when it is made resident again."""
    from gpupool import SamplingParams
    from gpupool.models import loaded as loaded_module
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout
    from tests.factories import make_engine

    def worker_steps() -> int:
        return loaded_module.PACK_AFTER_STEPS + 2

    folder = tiny_models("llama")
    one = build_layout(ModelConfig.from_folder(folder), torch.bfloat16).num_bytes
    e = make_engine(folder, name="a", dtype="bfloat16", weight_bytes=one, prefetch=False,
                    native=False, batch_invariant=False)  # torch's fast path packs weights
    try:
        e.add_model("b", folder)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        first = e.generate([5, 6, 7], params, model="a")[0].token_ids
        a, b = e.local.core.workers["a"].model, e.local.core.workers["b"].model
        assert a.layers and a.head is not None
        assert not a.packed  # 3 steps: too few to pay for a reorder
        long = SamplingParams(max_tokens=worker_steps(), temperature=0, ignore_eos=True)
        e.generate([5, 6, 7], long, model="a")
        assert a.packed  # resident long enough: packed where packing works (its probe)
        assert a.layers[0]["qkv_weight"].is_mkldnn == lin._pack_ok(torch.bfloat16)
        e.generate([5, 6, 7], params, model="b")
        assert a.layers == [] and a.head is None and a.w == {}  # evicted: nothing held
        assert b.layers and b.head is not None
        assert e.generate([5, 6, 7], params, model="a")[0].token_ids == first
        assert b.layers == []
        e.check_integrity()
    finally:
        e.shutdown()
