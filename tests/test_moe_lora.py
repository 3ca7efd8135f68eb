"""LoRA on a mixture's experts (peft's ``target_parameters`` on ``mlp.experts.gate_up_proj`` and
``mlp.experts.down_proj``): each expert's own A and B, served beside attention LoRA and the
base model in one batch, against peft; bad files refused at registration."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpupool import SamplingParams
from gpupool.adapters.base import AdapterError
from tests.factories import hf_greedy_with, make_engine, make_peft_adapter, random_prompts
from tests.test_lora import _packs_as_the_reference

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_adapters(tiny_models, tmp_path_factory):
    """Per variant: its folder and three adapters, one on q_proj and both expert weights
    (rank 4), one on the experts' down weights only (rank 2), one on q/v only (rank 4)."""
    made = {}

    def get(variant):
        if variant not in made:
            folder = tiny_models(variant)
            out = tmp_path_factory.mktemp(f"{variant}_lora")
            both = make_peft_adapter(folder, out / "both", 4, ["q_proj"],
                                     target_parameters=EXPERTS, seed=1)
            down = make_peft_adapter(folder, out / "down", 2, None,
                                     target_parameters=["mlp.experts.down_proj"], seed=2)
            attn = make_peft_adapter(folder, out / "attn", 4, ["q_proj", "v_proj"], seed=3)
            made[variant] = folder, {"both": both, "down": down, "attn": attn}
        return made[variant]

    return get


def _peft_greedy(folder, adapters: dict, prompts, names) -> list[list[int]]:
    """Each prompt's greedy tokens from peft with its adapter active (peft cannot mix adapters
    on experts in one batch), or from transformers for the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    want = {}
    for name in set(names):
        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model = (base if name is None
                 else PeftModel.from_pretrained(base, str(adapters[name])).eval())
        mine = [p for p, n in zip(prompts, names) if n == name]
        want[name] = iter(hf_greedy_with(model, mine, GREEDY.max_tokens))
    return [next(want[n]) for n in names]


@pytest.mark.parametrize("variant,invariant", [("qwen3_moe", True), ("mixtral", True),
                                               ("qwen3_moe", False), ("gpt_oss", True)])
def test_expert_lora_gives_peft_tokens_in_a_mixed_batch(moe_adapters, variant, invariant):
    """fp32: adapters on the experts (and on attention) beside the base model in one batch
    (gpt-oss: its B rows for gate_up split as its interleaved weights are at load):
    greedy tokens identical to peft's, each adapter changing its prompts' tokens (each row's
    terms alone, or without batch invariance a slot's rows at once); packed from the files'
    bytes as the reference packs them."""
    folder, adapters = moe_adapters(variant)
    # "segment": a name the step's own lookups once shared a dict with
    adapters = {"both": adapters["both"], "segment": adapters["down"]}
    prompts = random_prompts(6, 3, 14, seed=6 if variant == "gpt_oss" else 5)
    names = ["both", None, "segment", "both", "segment", None]
    want = _peft_greedy(folder, adapters, prompts, names)
    base = _peft_greedy(folder, adapters, prompts, [None] * len(prompts))
    assert all(w != b for w, b, n in zip(want, base, names) if n)  # the adapters matter
    engine = make_engine(folder, batch_invariant=invariant)
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, "m", path)
        ops = engine.local.core.workers["m"].model.ops
        assert ops.batch_invariant == invariant
        got = engine.generate(prompts, GREEDY, model=[n or "m" for n in names])
        assert [list(o.token_ids) for o in got] == want
        engine.check_integrity()
        _packs_as_the_reference(engine, list(adapters))  # the plan splits them as peft
    finally:
        engine.shutdown()


def test_expert_lora_in_bf16_gives_a_request_the_same_tokens_alone_and_batched(moe_adapters):
    """bf16 on the kernels: a request's tokens and logprobs do not depend on what shares its
    steps (the experts' LoRA terms row by row)."""
    folder, adapters = moe_adapters("qwen3_moe")
    prompts = random_prompts(5, 3, 14, seed=9)
    names = ["both", "down", None, "both", "down"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    engine = make_engine(folder, dtype="bfloat16")
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, "m", path)
        batched = engine.generate(prompts, params, model=[n or "m" for n in names])
        for i, (p, n) in enumerate(zip(prompts, names)):
            alone = engine.generate([p], params, model=n or "m")[0]
            assert list(alone.token_ids) == list(batched[i].token_ids), i
            assert alone.logprobs == batched[i].logprobs, i
        _packs_as_the_reference(engine, list(adapters))  # with the pieces' bf16 part
    finally:
        engine.shutdown()


def _broken_copy(src, dst, edit) -> None:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(edit(tensors), str(dst / "adapter_model.safetensors"))


def test_bad_expert_lora_is_refused_at_registration(moe_adapters, tiny_models, tmp_path):
    """Expert tensors of the wrong rank or shape, or on a dense model, are refused naming the
    problem; the engine keeps serving its registered adapters."""
    folder, adapters = moe_adapters("qwen3_moe")

    def narrow(t):  # one expert fewer in down's A: fits neither expert weight
        return {k: (v[:-2] if k.endswith("experts.lora_A.weight") else v)
                for k, v in t.items()}

    _broken_copy(adapters["down"], tmp_path / "narrow", narrow)
    dense = make_peft_adapter(tiny_models("llama"), tmp_path / "dense", 2, ["q_proj"])
    cfg = json.loads((dense / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.down_proj"]
    (tmp_path / "on_dense").mkdir()
    (tmp_path / "on_dense" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.ones(8, 64),
               "base_model.model.model.layers.0.mlp.experts.lora_B.weight": torch.ones(64, 8)},
              str(tmp_path / "on_dense" / "adapter_model.safetensors"))
    engine = make_engine(folder)
    try:
        engine.add_adapter("both", "m", adapters["both"])
        with pytest.raises(AdapterError, match="fits neither"):
            engine.add_adapter("narrow", "m", tmp_path / "narrow")
        before = engine.generate([[5, 6, 7]], GREEDY, model="both")[0].token_ids
        llama = make_engine(tiny_models("llama"))
        try:
            with pytest.raises(AdapterError, match="not a mixture-of-experts layer"):
                llama.add_adapter("x", "m", tmp_path / "on_dense")
        finally:
            llama.shutdown()
        assert engine.generate([[5, 6, 7]], GREEDY, model="both")[0].token_ids == before
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", ["qwen3_moe", "gpt_oss"])
def test_expert_lora_on_two_ranks_gives_one_ranks_tokens(moe_adapters, variant):
    """Sharded over 2 ranks (gloo, fp32): each expert's gate_up B cut to the rank's gate and
    up rows, its down A to the rank's input columns (B whole, the layer's all-reduce summing
    the ranks' terms): a mixed batch's greedy tokens are the one-rank engine's (gpt-oss: its
    interleaved gate_up B rows split as read, then cut as its weights)."""
    folder, adapters = moe_adapters(variant)
    prompts = random_prompts(4, 3, 14, seed=13)
    names = ["both", "down", None, "both"]
    got = {}
    for world in (1, 2):
        engine = make_engine(folder, **({"tensor_parallel": 2, "prefetch": False}
                                        if world == 2 else {}))
        try:
            for name, path in adapters.items():
                engine.add_adapter(name, "m", path)
            outs = engine.generate(prompts, GREEDY, model=[n or "m" for n in names])
            got[world] = [list(o.token_ids) for o in outs]
        finally:
            engine.shutdown()
    assert got[2] == got[1]
    assert got[1] == _peft_greedy(*moe_adapters(variant), prompts, names)


def test_expert_adapters_run_in_the_one_call_experts(moe_adapters, monkeypatch):
    """bf16 on the kernels, the layout holding the expert groups: a step whose adapters are
    on attention only runs each mixture layer in the native one-call experts without expert
    terms, and one with expert LoRA in the same call with them (native.moe_lora); under the
    loop (the call refused) the rows without expert terms keep their bits and the adapted
    rows their tokens, their logprobs within 0.15 (the call adds the terms as native.lora
    does, float32 throughout, the loop rounds each product to bf16: on this tiny random
    model bf16's own spread, teacher-forced against fp32 max 0.17 for the call, 0.20 for
    the loop, 0.12 between them)."""
    from gpupool.adapters.batch import LoraBatch
    from gpupool.kernels import native

    folder, adapters = moe_adapters("qwen3_moe")
    engine = make_engine(folder, dtype="bfloat16")
    calls = []
    real = native.moe_experts
    monkeypatch.setattr(native, "moe_experts",
                        lambda *a: calls.append(a[5] is not None) or real(*a))
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, "m", path)
        if not engine.local.core.workers["m"].model.ops.name == "native":
            pytest.skip("no native kernels here: the one-call experts do not exist")
        engine.generate([[5, 6, 7]], GREEDY, model="attn")
        assert calls and not any(calls)  # the one call, though the layout holds the groups
        calls.clear()
        prompts = random_prompts(4, 3, 14, seed=21)
        names = ["both", "attn", "down", None]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
        one_call = engine.generate(prompts, params, model=[n or "m" for n in names])
        assert calls and all(calls)  # expert LoRA in the call
        monkeypatch.setattr(LoraBatch, "native_experts", lambda self: None)
        calls.clear()
        loop = engine.generate(prompts, params, model=[n or "m" for n in names])
        assert not calls  # refused: the loop over experts
        for name, a, b in zip(names, one_call, loop):
            assert list(a.token_ids) == list(b.token_ids), name
            if name in ("attn", None):
                assert a.logprobs == b.logprobs, name
            else:
                diffs = [abs(x[1] - y[1]) for x, y in zip(a.logprobs, b.logprobs)]
                assert len(diffs) == 6 and max(diffs) < 0.15, (name, diffs)
    finally:
        engine.shutdown()
