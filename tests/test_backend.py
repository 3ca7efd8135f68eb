"""The kernel backend is chosen once per model from the engine's settings, never a process-wide
switch: two engines in one process keep theirs."""

import pytest
import torch

from gpupool import SamplingParams
from gpupool.kernels import backend, native
from gpupool.models.config import ModelConfig
from tests.factories import make_engine, random_prompts

CPU = torch.device("cpu")


def test_the_backend_names_int8_scales_as_the_weight_layout_does():
    """kernels may not import pool (the layers), so the suffix is written in both: equal."""
    from gpupool.pool.weights import SCALE_SUFFIX

    assert backend.SCALE_SUFFIX == SCALE_SUFFIX


def test_select_follows_device_dtype_model_and_settings(tiny_models):
    llama = ModelConfig.from_folder(tiny_models("llama"))
    qwen3 = ModelConfig.from_folder(tiny_models("qwen3"))  # per-head q/k norm
    fp32 = backend.select(CPU, torch.float32, llama)
    assert type(fp32) is backend.TorchOps and not fp32.fused_lora
    ref = backend.select(CPU, torch.bfloat16, llama, kernels="reference")
    assert type(ref) is backend.TorchOps and ref.reference_only
    assert type(backend.select(CPU, torch.float32, llama, kernels="triton")) is backend.TritonOps
    off = backend.select(CPU, torch.bfloat16, llama, use_native=False)
    assert type(off) is backend.TorchOps and not off.fused_lora
    if not native.available():
        pytest.skip("the native kernels did not build here: the bf16 choices below need them")
    assert type(backend.select(CPU, torch.bfloat16, llama)) is backend.NativeOps
    q3 = backend.select(CPU, torch.bfloat16, qwen3)  # per-head q/k norms before native RoPE
    assert type(q3) is backend.NativeOps and q3.fused_lora


def test_two_engines_in_one_process_keep_their_backends(tiny_models, monkeypatch):
    """A bf16 engine on the native kernels and one with native=False, used in turns: each
    model keeps the backend its engine chose, and only the first ever calls a kernel."""
    if not native.available():
        pytest.skip("the native kernels did not build here")
    folder = tiny_models("llama")
    on = make_engine(folder, dtype="bfloat16")
    off = make_engine(folder, dtype="bfloat16", native=False)
    calls = []
    for name in ("decode_layers", "decode_attention", "add_rmsnorm"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name,
                            lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = random_prompts(2, 4, 9, seed=3)
    try:
        assert on.local.core.workers["m"].model.ops.name == "native"
        assert off.local.core.workers["m"].model.ops.name == "torch"
        for engine, uses_native in ((on, True), (off, False), (on, True), (off, False)):
            before = len(calls)
            engine.generate(prompts, params)
            assert (len(calls) > before) == uses_native
    finally:
        on.shutdown()
        off.shutdown()
