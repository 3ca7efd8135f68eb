"""dtype "auto" on CPU follows the CPU's own flags, and bf16 agrees with transformers in bf16
(and with fp32) within stated bounds. The bf16 path runs on every CPU (slowly where the CPU
has no native bf16): nothing here skips for a CPU feature."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpupool import SamplingParams
from gpupool.models.config import ModelConfig
from gpupool.models.cpu import auto_cpu_dtype, native_bf16
from gpupool.models.loaded import resolve_dtype
from tests.factories import (
    hf_gap_in_ulps,
    hf_greedy_with,
    lora_pages,
    make_engine,
    make_peft_adapter,
    random_prompts,
)

ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "amx_tile", "amx_bf16"}
OLD = {"avx2", "fma", "f16c"}


@pytest.mark.parametrize("flags, gemv, want", [
    (ZEN4, True, torch.bfloat16), (SAPPHIRE_RAPIDS, False, torch.bfloat16),
    (OLD, True, torch.bfloat16), (OLD, False, torch.float32), (set(), True, torch.float32)],
    ids=["avx512_bf16", "amx", "avx2-with-gemv", "avx2-no-kernels", "unknown"])
def test_auto_on_cpu_follows_the_cpu_flags(tiny_models, flags, gemv, want):
    """bf16 where the CPU computes it natively, or on AVX2 + FMA where the native bf16 GEMV
    built (``gemv``: whether it did); float32 elsewhere, and whenever asked for."""
    cfg = ModelConfig.from_folder(tiny_models("llama"))
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cfg, cpu, cpu_flags=flags, bf16_gemv=gemv) is want
    assert native_bf16(flags) == (flags in (ZEN4, SAPPHIRE_RAPIDS))
    assert resolve_dtype("float32", cfg, cpu, cpu_flags=flags, bf16_gemv=gemv) is torch.float32
    assert auto_cpu_dtype(flags, gemv) == ("bfloat16" if want is torch.bfloat16 else "float32")


def test_bf16_agrees_with_transformers_bf16_and_with_fp32(tiny_models):
    """Stated bounds on 8 random prompts x 12 greedy tokens of a tiny random Llama (whose
    logits are nearly flat, so rounding flips near-ties): against transformers in bf16, the
    first token identical for every prompt, and every token one transformers (fed our
    tokens) rates within one bf16 rounding of its best (a flipped tie, then the sequences
    part: counting equal tokens measured luck, 78-85%); against our fp32,
    every first token bf16 picks is one fp32 rates within 0.15 nats of its own best."""
    folder = tiny_models("llama")
    prompts = random_prompts(8, 4, 16, seed=61)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
    e16 = make_engine(folder, dtype="bfloat16")
    e32 = make_engine(folder, dtype="float32")
    try:
        ours16 = [list(o.token_ids) for o in e16.generate(prompts, params)]
        top32 = [o.logprobs[0][2] for o in e32.generate(prompts, first)]
    finally:
        e16.shutdown()
        e32.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    theirs16 = hf_greedy_with(hf, prompts, 12)
    assert all(a[0] == b[0] for a, b in zip(ours16, theirs16))
    assert hf_gap_in_ulps(hf, prompts, ours16) <= 1.0
    for tokens, top in zip(ours16, top32):
        rated = dict(top)
        assert tokens[0] in rated and rated[tokens[0]] >= top[0][1] - 0.15


def test_bf16_lora_runs_its_adapter_terms_in_fp32_and_agrees_with_fp32(tiny_models, tmp_path):
    """On CPU a bf16 model's LoRA slots are float32 (its small products are faster there) and
    the adapter terms are summed in fp32 (the fused kernel's bf16 mirror of the slots rounds
    the weights, not the sums). Each bf16 first token with an adapter is one the fp32 engine
    rates within 0.15 nats of its own best, and the adapters change the output."""
    folder = tiny_models("llama")
    a = make_peft_adapter(folder, tmp_path / "a", 4, ["q_proj", "v_proj", "down_proj"], seed=5)
    b = make_peft_adapter(folder, tmp_path / "b", 8, ["o_proj", "gate_proj", "up_proj"],
                          seed=6)
    prompts = random_prompts(6, 4, 16, seed=62)
    prompts[2] = prompts[1] = prompts[0]  # the same prompt with a, b and the base
    names = ["a", "b", None, "b", "a", "b"]
    first = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = {}
    for dtype in ("bfloat16", "float32"):
        e = make_engine(folder, dtype=dtype, max_lora_rank=8)
        try:
            e.add_adapter("a", "m", a)
            e.add_adapter("b", "m", b)
            worker = e.local.core.workers["m"]
            assert worker.adapter_dtype == torch.float32
            outs[dtype] = [e.generate([p], first if dtype == "float32" else greedy,
                                      model=n or "m")[0] for p, n in zip(prompts, names)]
            assert worker.adapter_pages.layout.dtype == torch.float32
        finally:
            e.shutdown()
    for o16, o32 in zip(outs["bfloat16"], outs["float32"]):
        top = o32.logprobs[0][2]
        rated = dict(top)
        assert o16.token_ids[0] in rated and rated[o16.token_ids[0]] >= top[0][1] - 0.15
    base = [list(o.token_ids) for o in outs["bfloat16"]]
    assert base[0] != base[2] and base[1] != base[2]  # each adapter changes the output


def test_the_batched_lora_path_matches_the_segmented_one():
    """LoraBatch's batched path (equal segments, one rank; used for 16-bit models on CPU)
    gives the segmented SGMV path's output within fp32 rounding, with the segments' slots in
    order (views) and permuted (a gather); other batches keep the segmented path. (The fused
    CPU kernel, which would take these small batches first, is off here: test_kernels_native
    checks it.)"""
    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.batch import LoraBatch

    _check_batched_lora(GROUPS, LoraBatch)  # LoraBatch's default backend: torch's


def _check_batched_lora(GROUPS, LoraBatch):

    g = torch.Generator().manual_seed(3)
    widths = {"hidden": 24, "q": 24, "kv": 8, "inter": 40}
    six = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "o_proj")
    specs = {"a": (4, six), "b": (4, six), "c": (8, ("q_proj",))}
    paged, tables = lora_pages(widths, specs, g)
    targets = {n: t for n, (_, t) in specs.items()}
    for rows in (["a", "a", "a", "b", "b", "b"], ["b", "b", "b", "a", "a", "a"],
                 ["a", "a", "b", "b", "b", "a"]):  # in order, permuted (a gather), padded
        fast = LoraBatch.build(rows, tables, paged, targets, "cpu", batched=True)
        slow = LoraBatch.build(rows, tables, paged, targets, "cpu", batched=False)
        assert fast.batched is not None and slow.batched is None
        assert (fast.batched[-1] is None) == (rows[2] == rows[0])  # equal segments: no pad
        for group, (fan_in, projs) in GROUPS.items():
            x = torch.randn(len(rows), widths[fan_in], generator=g).to(torch.bfloat16)
            n = sum(widths[f] for _, f in projs)
            base = torch.randn(len(rows), n, generator=g).to(torch.bfloat16)
            got, want = base.clone(), base.clone()
            fast.apply(0, group, x, got)
            slow.apply(0, group, x, want)
            assert not torch.equal(want, base)  # the adapters did add something
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    for rows in (["a"] * 8 + ["b", "a"], ["a", None, "b"], ["a", "c"]):  # padding, base, ranks
        assert LoraBatch.build(rows, tables, paged, targets, "cpu",
                               batched=True).batched is None
