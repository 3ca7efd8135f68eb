"""int8 weight-only models (issue 16): the flat layout, the kernel against its reference, the
whole forward pass against the same model with de-quantized float weights, adapters on an
int8 base, and GGUF Q8_0 files (written here with the gguf package's writer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpupool import SamplingParams
from gpupool.kernels import linear as lin
from gpupool.kernels import triton_available
from gpupool.models.batch import BatchRow
from gpupool.models.config import ModelConfig
from gpupool.models.llama import LlamaModel
from gpupool.models.loader import build_layout, quantize_rows
from gpupool.models.runner import build_batch
from gpupool.pool.weights import SCALE_SUFFIX
from tests.factories import hf_greedy, make_engine, make_peft_adapter, make_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = [[1, 5, 9, 23, 44, 2, 17], [3, 4, 5, 6]]


def test_int8_layout_stores_int8_with_row_scales(tmp_path):
    cfg = ModelConfig.from_folder(make_tiny_model(tmp_path / "m", "llama"))
    dense = build_layout(cfg, torch.bfloat16)
    q = build_layout(cfg, torch.bfloat16, "int8")
    assert q.num_bytes < dense.num_bytes * 0.6
    views = q.views(q.allocate())
    for name in ("layers.0.qkv_weight", "layers.1.down_weight", "lm_head"):
        assert views[name].dtype == torch.int8
        assert views[name + SCALE_SUFFIX].shape == (views[name].shape[0],)
        assert views[name + SCALE_SUFFIX].dtype == torch.bfloat16
    assert views["embed_tokens"].dtype == torch.bfloat16  # untied: an embedding, not a linear
    assert views["layers.0.input_norm"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantization"):
        build_layout(cfg, torch.float32, "int3")


def test_quantize_rows_error_is_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 96, generator=g) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0.0  # an all-zero row
    for dtype in (torch.float32, torch.bfloat16):
        q, s = quantize_rows(w, dtype)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and s.dtype == dtype
        err = (q.float() * s.float()[:, None] - w).abs()
        assert bool((err <= s.float()[:, None] * 0.5 + 1e-12).all())
        assert int(q[3].abs().max()) == 0


@pytest.mark.parametrize("rows", [1, 3, 8, lin.INT8_PACK_MAX_ROWS, lin.INT8_PACK_MAX_ROWS + 5])
@pytest.mark.parametrize("k", [64, 96, 48])  # 48: not a multiple of 32 -> the reference
def test_int8_linear_matches_its_reference(rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    w = torch.randn(40, k, generator=g)
    bias = torch.randn(40, generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, s = quantize_rows(w, dtype)
        x = torch.randn(rows, k, generator=g).to(dtype)
        exact = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
        for b in (None, bias.to(dtype)):
            got = lin.linear_int8(x, q, s, b).double()
            want = exact if b is not None else exact - bias.double()
            assert got.shape == (rows, 40)
            assert (got - want).abs().max() <= tol * want.abs().max(), (dtype, rows, k)


def test_int8_kernel_can_be_switched_off():
    g = torch.Generator().manual_seed(1)
    q, s = quantize_rows(torch.randn(32, 64, generator=g), torch.bfloat16)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    on = lin.linear_int8(x, q, s)
    try:
        lin.use_int8_kernel(False)
        off = lin.linear_int8(x, q, s)
    finally:
        lin.use_int8_kernel(None)
    assert torch.allclose(on.float(), off.float(), rtol=2e-2, atol=2e-2)


def _dequantized_twin(worker) -> LlamaModel:
    """The worker's model with every int8 weight replaced by int8 * scale in its dtype (and
    every 4-bit one by its float32 values: issue 34)."""
    from gpupool.kernels import quant4
    from gpupool.pool.weights import GOFFSET_SUFFIX, GSCALE_SUFFIX

    views = worker.model.w
    twin = {k: v for k, v in views.items()
            if not k.endswith((SCALE_SUFFIX, GSCALE_SUFFIX, GOFFSET_SUFFIX))}
    for name in list(twin):
        if name + SCALE_SUFFIX in views:
            twin[name] = (views[name].double()
                          * views[name + SCALE_SUFFIX].double()[:, None]).to(worker.dtype)
        elif name + GSCALE_SUFFIX in views:
            twin[name] = quant4.dequantize(views[name], views[name + GSCALE_SUFFIX],
                                           views[name + GOFFSET_SUFFIX]).to(worker.dtype)
    model = LlamaModel(worker.cfg, worker.dtype, worker.device)
    model.bind(twin)
    return model


def _rows(worker, adapter=None) -> list[BatchRow]:
    return [BatchRow(token_ids=p, start=0, pages=[1 + 2 * i, 2 + 2 * i], is_decode=False,
                     samples=True, adapter=adapter) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("variant", ["llama", "qwen2"])  # untied + no bias; tied + qkv bias
def test_int8_forward_is_the_dequantized_model(tmp_path, variant):
    """fp32: the int8 model's logits are those of the same model with float weights int8 *
    scale (the embedding of a tied model reads int8 rows too); only rounding differs."""
    folder = make_tiny_model(tmp_path / variant, variant)
    engine = make_engine(folder, "q", quantization="int8")
    try:
        worker = engine.local.core.workers["q"]
        worker.make_resident()
        batch = build_batch(_rows(worker), worker.block_tokens, worker.device)
        got = worker.model.forward(batch, worker.kv_view)
        want = _dequantized_twin(worker).forward(batch, worker.kv_view)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert engine.stats()["models"]["q"]["quantization"] == "int8"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_adapters_on_a_quantized_base(tmp_path, quantization):
    """A LoRA adapter's terms on an int8 or 4-bit base: the same as on the de-quantized
    base."""
    folder = make_tiny_model(tmp_path / "base", "llama")
    ad = make_peft_adapter(folder, tmp_path / "ad", 8,
                           ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    engine = make_engine(folder, "q", quantization=quantization)
    try:
        engine.add_adapter("a", "q", ad)
        worker = engine.local.core.workers["q"]
        worker.make_resident()
        rows = _rows(worker, adapter="a")
        batch = build_batch(rows, worker.block_tokens, worker.device)
        lora = worker._lora_batch(rows)
        got = worker.model.forward(batch, worker.kv_view, lora)
        want = _dequantized_twin(worker).forward(batch, worker.kv_view, lora)
        base = worker.model.forward(batch, worker.kv_view)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        assert (got - base).abs().max() > 0.1  # the adapter did something
        outs = engine.generate(PROMPTS, GREEDY, model="a")
        assert all(len(o.token_ids) == 8 for o in outs)
    finally:
        engine.shutdown()


def test_int8_and_bf16_models_share_a_pool_and_swap(tmp_path):
    """An int8 model swaps in with its own (smaller) byte count and gives the same tokens
    after being swapped out and back in (a weight region that holds one model at a time)."""
    folder = make_tiny_model(tmp_path / "m", "llama")
    dense = build_layout(ModelConfig.from_folder(folder), torch.bfloat16).num_bytes
    engine = make_engine(dtype="bfloat16", weight_bytes=dense + 4096, prefetch=False)
    try:
        engine.add_model("q", folder, quantization="int8")
        engine.add_model("b", folder)
        first = [o.token_ids for o in engine.generate(PROMPTS, GREEDY, model="q")]
        engine.generate(PROMPTS, GREEDY, model="b")  # evicts q
        before = engine.stats()["swaps"]
        again = [o.token_ids for o in engine.generate(PROMPTS, GREEDY, model="q")]
        after = engine.stats()["swaps"]
        assert first == again
        assert after["weight_swaps"] == before["weight_swaps"] + 1
        q_bytes = engine.stats()["models"]["q"]["weight_bytes"]
        assert after["weight_bytes"] - before["weight_bytes"] == q_bytes < 0.6 * dense
    finally:
        engine.shutdown()


# ---- GGUF Q8_0 -------------------------------------------------------------------------------
def _gguf_name(hf: str) -> str:
    from gpupool.models.gguf import _LAYER_NAMES, _TOP_NAMES

    stem, _, kind = hf.rpartition(".")
    for g, h in _TOP_NAMES.items():
        if stem == h:
            return f"{g}.{kind}"
    parts = stem.split(".", 3)  # model, layers, i, rest
    inverse = {h: g for g, h in _LAYER_NAMES.items()}
    return f"blk.{parts[2]}.{inverse[parts[3]]}.{kind}"


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's order (the inverse of gguf.unpermute_rows)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def write_q8_0_gguf(folder, path, twin_folder) -> None:
    """``folder``'s model as a weights-only GGUF file: 2-D tensors Q8_0, the rest F32; and in
    ``twin_folder`` the same model with float weights equal to Q8_0's de-quantized values."""
    from gguf import GGMLQuantizationType, GGUFWriter, dequantize, quantize
    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    twin = {}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    for name, t in tensors.items():
        a = t.float().numpy()
        if a.ndim == 2:
            packed = quantize(a, GGMLQuantizationType.Q8_0)
            twin[name] = torch.from_numpy(
                dequantize(packed, GGMLQuantizationType.Q8_0).reshape(a.shape).copy())
            kind = name.split(".")[-2]
            if kind in heads:
                packed = quantize(_permute_rows(a, heads[kind]), GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name), packed, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            twin[name] = t.float()
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    twin_folder.mkdir()
    (twin_folder / "config.json").write_text((folder / "config.json").read_text())
    save_file(twin, str(twin_folder / "model.safetensors"), metadata={"format": "pt"})


def test_gguf_q8_0_file_loads_and_requantizes(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    path = tmp_path / "tiny.Q8_0.gguf"
    write_q8_0_gguf(folder, path, tmp_path / "twin")
    engine = make_engine(home=tmp_path / "home")
    try:
        engine.add_model("g", path)  # converted into the engine's home, once
        got = [list(o.token_ids) for o in engine.generate(PROMPTS, GREEDY, model="g")]
        # fp32: token-exact with transformers on Q8_0's exact float values
        assert got == hf_greedy(tmp_path / "twin", PROMPTS, 8)
        engine.add_model("g8", path, quantization="int8")  # Q8_0 -> one scale per row
        converted = list((engine.config.home / "models").glob("tiny.Q8_0-*"))
        assert len(converted) == 1
        worker = engine.local.core.workers["g8"]
        worker.make_resident()
        batch = build_batch(_rows(worker), worker.block_tokens, worker.device)
        q8 = worker.model.forward(batch, worker.kv_view)
        engine.local.core.workers["g"].make_resident()
        ref = engine.local.core.workers["g"].model.forward(batch, worker.kv_view)
        # the requantization's loss, bounded (the tiny model's 0.5-scale weights amplify it)
        assert (q8 - ref).abs().max() < 0.15 * ref.abs().max()
    finally:
        engine.shutdown()

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("rows", [1, 5, 17, 70])  # each tile shape of kernels.int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # interpreter: no bf16 dot
def test_triton_int8_matches_its_reference(rows, dtype):
    """The Triton kernel (interpreted on CPU) against exact float64 products of int8 * scale,
    with K and N not multiples of the tiles, a bias and without, leading batch axes."""
    from gpupool.kernels import int8 as tk

    g = torch.Generator().manual_seed(rows)
    n, k = 72, 200
    w = torch.randn(n, k, generator=g)
    q, s = quantize_rows(w, dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = (torch.randn(rows, k, generator=g) / 4).to(dtype)
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for b in (None, bias):
        got = tk.linear_int8(x, q, s, b)
        want = exact if b is None else exact + b.double()
        assert got.dtype == dtype and got.shape == (rows, n)
        assert (got.double() - want).abs().max() <= tol * want.abs().max(), (rows, dtype)
    got3 = tk.linear_int8(x.view(1, rows, k), q, s)
    assert got3.shape == (1, rows, n) and torch.equal(got3[0], tk.linear_int8(x, q, s))
    with pytest.raises(ValueError, match="int8"):
        tk.linear_int8(x, q.float(), s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_int8_on_gpu(rows, dtype):
    """Compiled for real: linear_int8 on CUDA tensors takes the Triton kernel."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g)
    q, s = quantize_rows(w, dtype)
    x = torch.randn(rows, 576, generator=g).to(dtype)
    bias = torch.randn(960, generator=g).to(dtype)
    exact = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
    got = lin.linear_int8(x.cuda(), q.cuda(), s.cuda(), bias.cuda()).cpu()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
