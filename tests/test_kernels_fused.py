"""The fused Triton kernels (kernels/fused.py: residual add + RMSNorm, SiLU x up, RoPE + KV
write) against the torch reference, interpreted on CPU (compiled on a GPU by
scripts/gpu_check.sh); float32 and bf16, widths on both sides of a power of two, strided
rows."""

import pytest
import torch

from gpupool.kernels import reference, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's float32 -> bf16 conversion is not the compiled one's (round to nearest
# even): bf16 is checked where the kernels are compiled
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEV == "cpu", reason="needs a GPU: the Triton interpreter rounds bf16 otherwise"))]


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    else:  # a bf16 step apart at most, and rarely (float32 sums in another order)
        diff = (got.float() - want.float()).abs()
        step = want.float().abs().clamp_min(1e-3) * 2**-7
        assert bool((diff <= step * 1.01).all()), diff.max()
        assert (diff > 0).float().mean() <= 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 576, 1000])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm_matches_the_reference(dtype, n, with_delta):
    from gpupool.kernels.fused import add_rmsnorm

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(7, n + 5, generator=g) * 3).to(dtype)[:, :n]  # strided rows
    delta = (torch.randn(7, n, generator=g)).to(dtype) if with_delta else None
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    x, w = x.to(DEV), w.to(DEV)
    delta = None if delta is None else delta.to(DEV)
    total, out = add_rmsnorm(x, delta, w, 1e-5)
    want_total = x + delta if with_delta else x
    assert torch.equal(total, want_total)
    _close(out, reference.rms_norm(want_total, w, 1e-5), dtype)
    assert total.data_ptr() != out.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [100, 1536, 1100])
def test_silu_mul_matches_the_reference(dtype, inter):
    from gpupool.kernels.fused import silu_mul

    g = torch.Generator().manual_seed(inter)
    gu = (torch.randn(5, 2 * inter, generator=g) * 4).to(dtype).to(DEV)
    _close(silu_mul(gu), reference.silu_mul(gu), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 64), (9, 3, 64), (3, 1, 80)])
def test_rope_kv_rotates_q_and_k_and_writes_only_their_slots(dtype, heads, kv_heads, d):
    from gpupool.kernels.fused import rope_kv

    g = torch.Generator().manual_seed(heads * d)
    tokens, pages, block = 11, 6, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d + 3, generator=g).to(dtype)
    qkv = qkv[:, : (heads + 2 * kv_heads) * d]  # strided rows
    angles = torch.rand(tokens, 1, d // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    storage = torch.randn(pages, 2, 2, block, kv_heads, d, generator=g).to(dtype)
    qkv, cos, sin, storage = (t.to(DEV) for t in (qkv, cos, sin, storage))
    k_cache, v_cache = storage[:, 1, 0], storage[:, 1, 1]  # strided layer views
    before = storage.clone()
    slots = torch.randperm(pages * block, generator=g)[:tokens]
    slot_pages, slot_offsets = (slots // block).to(DEV), (slots % block).to(DEV)
    q = rope_kv(qkv, cos, sin, heads, kv_heads, d, k_cache, v_cache, slot_pages, slot_offsets)
    ref = before.clone()
    qk = reference.apply_rope(qkv[:, : (heads + kv_heads) * d].reshape(tokens, -1, d), cos, sin)
    v = qkv[:, (heads + kv_heads) * d :].reshape(tokens, kv_heads, d)
    reference.write_kv(ref[:, 1, 0], ref[:, 1, 1], qk[:, heads:], v, slot_pages, slot_offsets)
    _close(q, qk[:, :heads], dtype)
    _close(storage, ref, dtype)
    written = torch.zeros(pages, block, dtype=torch.bool, device=DEV)
    written[slot_pages, slot_offsets] = True
    assert torch.equal(storage[:, 0], before[:, 0])  # the other layer untouched
    for kv in (0, 1):  # k and v of this layer: only the tokens' slots
        assert torch.equal(storage[:, 1, kv][~written], before[:, 1, kv][~written])


@pytest.mark.skipif(DEV == "cuda", reason="a CPU engine with the kernels interpreted; on a "
                    "GPU the kernel tests above run them compiled")
def test_an_engine_on_the_triton_backend_gives_the_reference_tokens(tiny_models):
    """Every layer through the fused kernels (interpreted here) beside Triton's attention:
    the same greedy tokens as the reference backend, and logprobs within 1e-4."""
    from gpupool import SamplingParams
    from tests.factories import make_engine, random_prompts

    prompts = random_prompts(3, 5, 20, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1, ignore_eos=True)
    outs = {}
    for kernels in ("triton", "reference"):
        e = make_engine(tiny_models("llama"), kernels=kernels)
        try:
            assert e.local.core.workers["m"].model.ops.name == (
                "triton" if kernels == "triton" else "torch")
            outs[kernels] = e.generate(prompts, params)
        finally:
            e.shutdown()
    for a, b in zip(outs["triton"], outs["reference"]):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):  # (token, its logprob, top)
            assert x[0] == y[0] and abs(x[1] - y[1]) < 1e-4
