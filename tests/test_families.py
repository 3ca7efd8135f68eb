"""Model families beyond Llama (issue 34) against transformers and peft in fp32: Phi-3
(fused qkv and gate_up checkpoints, LongRoPE, Phi-4-mini's partial rotary and tied
embeddings), Gemma 2 (sandwich norms, GeGLU, soft-capping, sliding-window layers) and Gemma
3 (q/k norms, the window layers' own rope base; the multimodal checkpoint's text model). The
plain parity over the reference prompts is tests/test_parity.py's (variants phi3,
phi3_partial, gemma2, gemma3: its prompts are longer than the windows of 8); here: the rotary
tables, sequences that cross LongRoPE's switch (which transformers' generate recomputes),
chunked prefill, the prefix cache and preemption, and adapters (on Phi's fused
projections)."""

from __future__ import annotations

import pytest
import torch

from gpupool import SamplingParams
from gpupool.kernels import quant4
from gpupool.models.config import ModelConfig
from gpupool.models.rope import cos_sin_table
from tests.factories import (
    VARIANTS,
    adapters_greedy,
    hf_greedy,
    make_engine,
    make_mxfp4_twins,
    make_peft_adapter,
    make_tiny_model,
    peft_greedy,
    random_prompts,
)

PHI = ("phi3", "phi3_partial")
FAMILIES = (*PHI, "gemma2", "gemma3")


@pytest.fixture(scope="module")
def switching(tmp_path_factory):
    """phi3 with its LongRoPE switch at 24 tokens: the test prompts cross it."""
    cls, extra = VARIANTS["phi3"]
    VARIANTS["phi3_switch24"] = (cls, {**extra, "original_max_position_embeddings": 24})
    try:
        return make_tiny_model(tmp_path_factory.mktemp("phi3s"), "phi3_switch24", seed=5)
    finally:
        del VARIANTS["phi3_switch24"]


@pytest.mark.parametrize("variant", PHI)
def test_rotary_tables_are_transformers(tiny_models, variant):
    """Each table row equals transformers' cos/sin for that position, short factors for a
    short sequence and long ones for a long one (partial rotary: the rotating dimensions,
    in the stored order; the others cos 1, sin 0)."""
    import transformers

    from gpupool.kernels.reference import rotary_order

    folder = tiny_models(variant)
    cfg = ModelConfig.from_folder(folder)
    rot = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32).model.rotary_emb
    order = rotary_order(cfg.head_dim, cfg.rotary_dim)
    r = cfg.rotary_dim
    for long, n in ((False, 100), (True, 200)):  # the switch is at 128
        cos, sin = rot(torch.zeros(1, n, 64), torch.arange(n)[None])
        table = cos_sin_table(cfg, n, torch.float32, "cpu", long=long)
        ours = table if order is None else table[:, :, torch.argsort(order)]
        assert torch.equal(ours[:, 0, :r], cos[0]) and torch.equal(ours[:, 1, :r], sin[0])
        assert bool((ours[:, 0, r:] == 1).all() and (ours[:, 1, r:] == 0).all())


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 16},
    {"factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False},  # gpt-oss's kind
    {"factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    {"factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.707}])  # DeepSeek's kind
def test_yarn_tables_are_transformers(params):
    """YaRN's cos/sin rows equal transformers' (its frequencies' ramp, truncated or not, and
    its attention factor, given, computed, or from mscale and mscale_all_dim)."""
    import transformers

    hf = transformers.Qwen3Config(head_dim=32, hidden_size=64, num_attention_heads=2,
                                  num_key_value_heads=2,
                                  max_position_embeddings=512, rope_parameters={
                                      "rope_type": "yarn", "rope_theta": 10000.0, **params})
    rot = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(hf)
    cfg = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    cos, sin = rot(torch.zeros(1, 300, 64), torch.arange(300)[None])
    table = cos_sin_table(cfg, 300, torch.float32, "cpu")
    assert torch.equal(table[:, 0], cos[0]) and torch.equal(table[:, 1], sin[0])
    assert not torch.equal(table, cos_sin_table(ModelConfig.from_dict(
        {**hf.to_dict(), "rope_parameters": {"rope_theta": 10000.0},
         "architectures": ["Qwen3ForCausalLM"]}), 300, torch.float32, "cpu"))


def test_sequences_crossing_the_longrope_switch_match_transformers(switching):
    """Prompts shorter than the switch that grow past it while decoding (transformers
    recomputes their cache with the long factors; so does the scheduler), and prompts longer
    than it; chunked, with the prefix cache on and preemption in a small KV pool."""
    prompts = random_prompts(6, 10, 36, seed=7)
    prompts.append(prompts[0][:])  # a cache hit on a short-factor prefix, then crossing
    want = hf_greedy(switching, prompts, 20)
    assert any(len(p) <= 24 < len(p) + 20 for p in prompts)
    assert any(len(p) > 24 for p in prompts)
    engine = make_engine(switching, max_num_batched_tokens=16, enable_prefix_caching=True,
                         kv_cache_bytes=24 << 10, kv_page_bytes=4 << 10)
    try:
        seqs_before = engine.local.core.scheduler.num_preemptions
        outs = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0,
                                                       ignore_eos=True))
        for out, ref, p in zip(outs, want, prompts):
            got = list(out.token_ids)
            assert got[: len(ref)] == ref, len(p)
        assert engine.local.core.scheduler.num_preemptions > seqs_before
        engine.check_integrity()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", FAMILIES)
def test_adapters_match_peft(tiny_models, tmp_path, variant):
    base = tiny_models(variant)
    qkv, gate_up = ((["qkv_proj"], ["gate_up_proj"]) if variant in PHI
                    else (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]))
    paths = {"fused": make_peft_adapter(base, tmp_path / "fused", 4, qkv + gate_up, seed=1),
             "all": make_peft_adapter(base, tmp_path / "all", 8,
                                      qkv + ["o_proj"] + gate_up + ["down_proj"], seed=2)}
    names = ["fused", None, "all", "fused", "all"]
    prompts = random_prompts(len(names), 4, 30, seed=8)
    want = peft_greedy(base, paths, prompts, names, 12)
    plain = hf_greedy(base, prompts, 12)
    assert all(w != b for w, b, n in zip(want, plain, names) if n)  # the adapters act
    engine = make_engine(base, max_lora_rank=8)
    try:
        assert adapters_greedy(engine, "m", paths, prompts, names, 12) == want
    finally:
        engine.shutdown()


def test_gemma2_chunked_cached_and_preempted(tiny_models):
    """Sliding-window layers and soft caps through chunked prefill (chunks of 5 tokens, the
    window 8), prefix-cache hits and preemption by recompute in a small KV pool."""
    folder = tiny_models("gemma2")
    prompts = random_prompts(6, 12, 40, seed=9)
    prompts += [prompts[1][:], prompts[4][:30]]  # cache hits
    want = hf_greedy(folder, prompts, 16)
    engine = make_engine(folder, max_num_batched_tokens=5, enable_prefix_caching=True,
                         kv_cache_bytes=40 << 10, kv_page_bytes=2 << 10)
    try:
        before = engine.local.core.scheduler.num_preemptions
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        outs = engine.generate(prompts[:6], params)
        assert engine.local.core.scheduler.num_preemptions > before
        for out, ref in zip(outs, want):
            assert list(out.token_ids)[: len(ref)] == ref
        engine.check_integrity()
    finally:
        engine.shutdown()
    engine = make_engine(folder, max_num_batched_tokens=5, enable_prefix_caching=True,
                         kv_page_bytes=2 << 10)
    try:  # a pool that keeps the first prompts' pages: the copies start from them
        engine.generate(prompts[:6], params)
        again = engine.generate(prompts[6:], params)
        assert all(o.cached_tokens > 0 for o in again)
        for out, ref in zip(again, want[6:]):
            assert list(out.token_ids)[: len(ref)] == ref
    finally:
        engine.shutdown()


def test_gemma3s_pattern_in_two_kv_groups_gives_transformers_tokens(tiny_models):
    """Three windowed layers and a global one: their pages hold 5 and 15 tokens (the
    global group's a multiple of the windowed one's); chunked prefill (chunks of 7),
    preemption with host swap in a small pool and prefix-cache hits give transformers'
    greedy tokens, and the windowed layers' pages behind the window are released."""
    folder = tiny_models("gemma3_wide")
    prompts = random_prompts(5, 20, 45, seed=33)
    prompts += [prompts[1][:], prompts[3][:40]]  # cache hits
    want = hf_greedy(folder, prompts, 14)
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    engine = make_engine(folder, max_num_batched_tokens=7, enable_prefix_caching=True,
                         kv_cache_bytes=12 * 4096, kv_page_bytes=4096)
    try:
        worker = engine.local.core.workers["m"]
        assert (worker.block_tokens, worker.window_group) == (15, (5, 8))
        scheduler = engine.local.core.scheduler
        outs = engine.generate(prompts[:5], params)
        assert scheduler.num_preemptions > 0 and scheduler.num_released_pages > 0
        engine.check_integrity()
    finally:
        engine.shutdown()
    engine = make_engine(folder, max_num_batched_tokens=7, enable_prefix_caching=True,
                         kv_page_bytes=4096)
    try:  # a pool that keeps the first prompts' pages: the copies start from them
        engine.generate(prompts[:5], params)
        again = engine.generate(prompts[5:], params)
        assert all(o.cached_tokens > 0 for o in again)
        engine.check_integrity()
    finally:
        engine.shutdown()
    for out, ref in zip([*outs, *again], want):
        assert list(out.token_ids)[: len(ref)] == ref


@pytest.mark.parametrize("variant", ["mistral", "qwen2_window", "gemma2", "gemma3",
                                     "gemma3_wide"])
def test_windows_and_gemma_in_bf16_give_a_request_the_same_tokens_whatever_shares_it(
        tiny_models, variant):
    """Models whose layers see their last 6 or 8 keys (every layer; Qwen2's from
    max_window_layers on; Gemma's alternate) in bf16 on the backend this machine selects
    (the native kernels' windowed attention where they built; Gemma's norms, GeGLU and soft
    caps by torch's ops between them): a 30-token prompt's greedy tokens alone equal its
    tokens beside other requests, in prefill chunks of 5, after preemption in a small pool
    and from prefix-cache hits (a request's tokens do not depend on what shares its
    steps)."""
    folder = tiny_models(variant)
    target = random_prompts(1, 30, 30, seed=13)[0]
    others = random_prompts(5, 8, 40, seed=14)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = make_engine(folder, dtype="bfloat16")
    try:
        alone = list(engine.generate([target], params)[0].token_ids)
    finally:
        engine.shutdown()
    every = variant == "mistral"  # every layer windowed (the others: half of them)
    engine = make_engine(folder, dtype="bfloat16", max_num_batched_tokens=5,
                         enable_prefix_caching=True, kv_cache_bytes=(4 if every else 10) << 11,
                         kv_page_bytes=2 << 10)
    try:
        scheduler = engine.local.core.scheduler
        before = scheduler.num_preemptions
        outs = engine.generate([others[0], target, *others[1:]], params)
        assert list(outs[1].token_ids) == alone
        assert scheduler.num_preemptions > before
        # every layer's pages behind the window (Mistral), or the windowed layers' own
        assert scheduler.num_released_pages > 0
        engine.check_integrity()
    finally:
        engine.shutdown()
    engine = make_engine(folder, dtype="bfloat16", max_num_batched_tokens=5,
                         enable_prefix_caching=True, kv_page_bytes=2 << 10)
    try:  # a pool that keeps the first requests' pages: the target's prefix from the cache
        engine.generate([target, *others[:2]], params)
        again = engine.generate([others[3], target], params)
        assert again[1].cached_tokens > 0 and list(again[1].token_ids) == alone
    finally:
        engine.shutdown()


def test_a_gemma_request_longer_than_every_layers_pages_would_hold_fits_its_groups(tiny_models):
    """Gemma 3's global and windowed (last 8 keys) layers keep pages of their own: in 8 pages
    of 16 tokens of one layer, a request holds its global layer's blocks and its windowed
    layer's window (3 pages: the window and a step's 16 tokens) only: 80 tokens, where every
    layer's blocks in one page list held 64 (8 tokens a page). A 72-token request, refused
    then, now gives transformers' tokens; the pool's accounting stays whole."""
    folder = tiny_models("gemma3")
    prompt = random_prompts(1, 50, 50, seed=31)[0]
    want = hf_greedy(folder, [prompt], 22)[0]
    engine = make_engine(folder, kv_cache_bytes=8 * 4096, kv_page_bytes=4096,
                         max_num_batched_tokens=16)
    try:
        worker = engine.local.core.workers["m"]
        assert (worker.block_tokens, worker.window_group) == (16, (16, 8))
        assert engine.model_info("m").context_limit == 80
        assert engine.stats()["models"]["m"]["kv_capacity_tokens"] == 80
        out = engine.generate([prompt], SamplingParams(max_tokens=22, temperature=0,
                                                       ignore_eos=True))[0]
        assert list(out.token_ids)[: len(want)] == want
        assert engine.local.core.scheduler.num_released_pages > 0
        engine.check_integrity()
        with pytest.raises(ValueError, match="holds 80 tokens"):
            engine.generate([prompt], SamplingParams(max_tokens=31))
    finally:
        engine.shutdown()


def test_a_multimodal_gemma3_checkpoint_serves_its_text_model(tiny_models, tmp_path):
    """Gemma 3 at 4B and above ships as Gemma3ForConditionalGeneration: its text model's
    config under text_config (completed by transformers' defaults), its tensors under
    model.language_model.; it gives the text model's tokens."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    text = tiny_models("gemma3")
    folder = tmp_path / "mm"
    shutil.copytree(text, folder)
    cfg = json.loads((text / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {**cfg, "model_type": "gemma3_text"}, "tie_word_embeddings": False,
        "eos_token_id": cfg["eos_token_id"]}))
    tensors = load_file(str(text / "model.safetensors"))
    save_file({k.replace("model.", "model.language_model.", 1): v
               for k, v in tensors.items()}, str(folder / "model.safetensors"))
    prompts = random_prompts(4, 10, 30, seed=10)
    want = hf_greedy(text, prompts, 12)
    engine = make_engine(folder)
    try:
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
        assert [list(o.token_ids) for o in outs] == want
    finally:
        engine.shutdown()


# ---- mixtures of experts ----------------------------------------------------------------------
MOE_VARIANTS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")


def _router_margins_clear(hf, ids: list[int], k: int) -> bool:
    """Whether every token's k-th expert probability exceeds its (k+1)-th by 1e-3 in every
    layer (transformers' router): a nearer tie could flip an expert either way."""
    with torch.no_grad():
        res = hf(torch.tensor([ids]), output_router_logits=True)
    for router in res.router_logits:
        srt = torch.softmax(router.float().view(len(ids), -1), dim=-1).sort(
            dim=-1, descending=True).values
        if not bool((srt[:, k - 1] - srt[:, k] > 1e-3).all()):
            return False
    return True


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_logits_and_tokens_match_transformers(tiny_models, variant):
    """On prompts whose router margins are checked to exceed 1e-3 (their generated tokens'
    too): prompt log-probabilities (every position's log-softmax at the next token) within
    1e-4 of transformers', and greedy tokens identical."""
    import transformers

    folder = tiny_models(variant)
    k = ModelConfig.from_folder(folder).experts_per_tok
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    candidates = random_prompts(80, 3, 10, seed=11)
    outs_hf = hf_greedy(folder, candidates, 8)
    prompts = [p for p, o in zip(candidates, outs_hf) if _router_margins_clear(hf, p + o, k)]
    assert len(prompts) >= 2, "too few prompts with clear router margins"  # of 80
    want = [o for p, o in zip(candidates, outs_hf) if p in prompts]
    engine = make_engine(folder)
    try:
        outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                                                       prompt_logprobs=0))
        for ids, out, ref in zip(prompts, outs, want):
            assert list(out.token_ids) == ref
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
            got = [e[1] for e in out.prompt_logprobs[1:]]
            assert got == pytest.approx(
                [logp[p, ids[p + 1]].item() for p in range(len(ids) - 1)], abs=1e-4)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe_k3"])  # 2 and 3 experts a token
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-torch"])
def test_a_moe_request_alone_has_its_batchs_tokens_and_logprobs(tiny_models, dtype, variant,
                                                                 monkeypatch):
    """Decoding a single row takes the one-row expert path (no gathers or scatters), a batch
    the general one (in bf16 on the native kernels: one call a layer, native.moe_experts; on
    the torch backend, the model's loops): the same tokens and log-probabilities, bit for
    bit."""
    from gpupool.kernels import native

    calls = []
    real = native.moe_experts
    monkeypatch.setattr(native, "moe_experts", lambda *a: calls.append(1) or real(*a))
    folder = tiny_models(variant)
    prompts = random_prompts(4, 5, 20, seed=13)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    engine = make_engine(folder, dtype=dtype.removesuffix("-torch"),
                         native=not dtype.endswith("-torch"))
    try:
        alone = engine.generate(prompts[:1], params)[0]
        batch = engine.generate(prompts, params)[0]
        assert list(alone.token_ids) == list(batch.token_ids)
        assert alone.logprobs == batch.logprobs
    finally:
        engine.shutdown()
    assert bool(calls) == (dtype == "bfloat16" and native.has_gemv())


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_mixture_stores_its_experts_so_and_serves_a_request_alike_in_any_batch(
        tiny_models, quantization):
    """--quantization int8 / int4 on a mixture (it used to fail at registration: the layout
    named dense MLP weights its MoE layers do not have): every expert stored so, the router
    not; bf16, a request alone gets its tokens in a batch."""
    from gpupool.models.loader import SCALE_SUFFIX

    suffix = SCALE_SUFFIX if quantization == "int8" else "_gscale"
    prompts = random_prompts(4, 5, 20, seed=19)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = make_engine(tiny_models("mixtral"), dtype="bfloat16", quantization=quantization)
    try:
        w = engine.local.core.workers["m"]
        w.make_resident()
        names = [n for n in w.model.w if ".experts." in n and n.endswith("_weight")]
        assert names and all(n + suffix in w.model.w for n in names)
        assert "layers.0.router_weight" + suffix not in w.model.w
        alone = engine.generate(prompts[:1], params)[0].token_ids
        assert engine.generate(prompts, params)[0].token_ids == alone
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant,quantization", [("qwen3_moe", None), ("qwen3_moe_k3", None),
                                                  ("qwen3_moe", "int4"), ("qwen3_moe", "int8"),
                                                  ("gpt_oss", None), ("gpt_oss", "int4")])
def test_the_native_experts_call_gives_the_models_loop_bit_for_bit(tiny_models, variant,
                                                                   quantization, monkeypatch):
    """bf16 on the native kernels (bf16, 4-bit or int8 experts; gpt-oss's with biases and
    its clamped SwiGLU): a batch's tokens and log-probabilities with the experts in one call
    a layer equal those of the model's loop over experts (LlamaModel._experts)."""
    from gpupool.kernels import native
    from gpupool.kernels.backend import NativeOps

    if not native.has_gemv():
        pytest.skip("this CPU's native build has no bf16 product")
    prompts = random_prompts(6, 5, 20, seed=17)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    calls = []
    real = native.moe_experts
    monkeypatch.setattr(native, "moe_experts", lambda *a: calls.append(1) or real(*a))
    outs = []
    for fused in (True, False):
        if not fused:
            assert calls  # the first engine took the one call
            monkeypatch.setattr(NativeOps, "experts", lambda self, *a: None)
        engine = make_engine(tiny_models(variant), dtype="bfloat16", quantization=quantization)
        if fused:
            w = engine.local.core.workers["m"]
            w.make_resident()
            stored = {"int4": "_gscale", "int8": "_scale"}.get(quantization)
            assert all(("layers.0.experts.0.down_weight" + sfx in w.model.w) == (sfx == stored)
                       for sfx in ("_gscale", "_scale"))  # the experts stored so
        try:
            outs.append([(list(o.token_ids), o.logprobs) for o in
                         engine.generate(prompts, params)])
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]


def test_a_dense_and_a_moe_model_take_turns_in_one_weight_region(tiny_models):
    from gpupool.models.loader import build_layout

    dense, moe = tiny_models("llama"), tiny_models("mixtral")
    sizes = [build_layout(ModelConfig.from_folder(f), torch.float32).num_bytes
             for f in (dense, moe)]
    prompts = random_prompts(2, 5, 20, seed=12)
    want = {n: hf_greedy(f, prompts, 8) for n, f in (("d", dense), ("e", moe))}
    engine = make_engine(weight_bytes=max(sizes) + (64 << 10))  # one model at a time
    try:
        engine.add_model("d", dense)
        engine.add_model("e", moe)
        for name in ("d", "e", "d", "e"):
            outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0),
                                   model=name)
            assert [list(o.token_ids) for o in outs] == want[name]
        assert engine.stats()["swaps"]["weight_swaps"] >= 3
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_attention_adapters_on_a_moe_model_match_peft(tiny_models, tmp_path):
    from gpupool import AdapterError

    base = tiny_models("mixtral")
    paths = {"att": make_peft_adapter(base, tmp_path / "att", 4,
                                      ["q_proj", "k_proj", "v_proj", "o_proj"], seed=3)}
    prompts = random_prompts(3, 5, 20, seed=13)
    want = peft_greedy(base, paths, prompts, ["att"] * 3, 8)
    engine = make_engine(base, max_lora_rank=8)
    try:
        engine.add_adapter("att", "m", paths["att"])
        outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0),
                               model="att")
        assert [list(o.token_ids) for o in outs] == want
        mlp = make_peft_adapter(tiny_models("qwen3_moe"), tmp_path / "mlp", 4,
                                ["gate_proj", "up_proj"], seed=4)  # its dense layer 1
        engine.add_model("q", tiny_models("qwen3_moe"))
        with pytest.raises(AdapterError):  # refused (the MLP of a mixture)
            engine.add_adapter("mlp", "q", mlp)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", (*FAMILIES, *MOE_VARIANTS))
def test_every_family_in_bf16_gives_a_request_its_tokens_whatever_shares_its_batch(
        tiny_models, variant):
    """"Same request, same tokens" in the default dtype on this CPU: Phi-3 on the native
    kernels, Gemma and the mixtures on the torch backend's fixed-order ops."""
    engine = make_engine(tiny_models(variant), dtype="bfloat16")
    try:
        prompts = random_prompts(5, 3, 30, seed=3)
        params = SamplingParams(max_tokens=8, temperature=0)
        batch = engine.generate(prompts, params)
        assert [o.token_ids for o in batch] == [engine.generate([p], params)[0].token_ids
                                                for p in prompts]
    finally:
        engine.shutdown()


def test_gemma_norms_round_as_transformers_in_bf16():
    """Gemma's norm weights are kept in float32 as 1 + weight: in bf16 a norm gives
    transformers' Gemma2RMSNorm's bits (1 + weight added in float32 at each call there)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from gpupool.kernels.reference import rms_norm

    torch.manual_seed(0)
    norm = Gemma2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(0.01 * torch.randn(64))  # small: 1 + w rounds away in bf16
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ours = rms_norm(x, norm.weight.float() + 1.0, 1e-6)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, norm(x))
    assert not torch.equal(rms_norm(x, (norm.weight.float() + 1.0).bfloat16(), 1e-6), norm(x))


def _released_and_poisoned(folder, dtype, release: bool, poison: bool):
    """Six requests of a model whose every layer sees its last 6 keys (or whose windowed
    layers, a KV group of their own, see their last 6 or 8), in a pool of 6 pages (every
    page kept: 64) with host swap, chunks of 7 tokens; with ``poison`` every free page is
    filled with NaN after each step (a kernel reading a released page, whose table entry
    names page 0 or whose bytes another request may now own, would then give NaN or other
    tokens)."""
    from gpupool.config import SchedulerConfig
    from gpupool.engine.core import EngineCore
    from gpupool.messages.types import EngineRequest
    from gpupool.models.loaded import LoadedModel
    from gpupool.pool.kv import KVStorage
    from tests.factories import DeltaLog

    kv = KVStorage(6 if release else 64, 4096 if dtype == torch.float32 else 2048,
                   "cpu")  # 8 tokens a page
    kv.enable_host_swap(64)
    core = EngineCore(SchedulerConfig(max_num_batched_tokens=7, enable_prefix_caching=False,
                                      max_prefill_tokens_while_decoding=7),  # not timed
                      kv.pages, kv)
    core.add_worker(LoadedModel("m", folder, torch.device("cpu"), kv, dtype))
    if not release:
        core.scheduler.windows["m"] = 0
        if "m" in core.scheduler.window_groups:  # a window no block is ever behind
            core.scheduler.window_groups["m"] = (core.scheduler.window_groups["m"][0], 1 << 30)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for i, ids in enumerate(random_prompts(6, 20, 40, seed=21)):
        core.enqueue(EngineRequest(str(i), "m", ids, params))
    log = DeltaLog()
    pages = kv.storage.view(kv.pages.num_pages, kv.page_bytes)
    while core.has_work():
        log.add(core.step())
        core.check_integrity()
        if poison:
            pages[torch.tensor(kv.pages._free, dtype=torch.long)] = 0xFF  # NaN in fp32, bf16
    assert kv.pages.num_used_pages == 0
    return ([log.tokens[str(i)] for i in range(6)], core.scheduler.num_released_pages,
            core.scheduler.num_preemptions)


@pytest.mark.parametrize("variant", ["mistral", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_pages_are_never_read(tiny_models, dtype, variant):
    """fp32 (the fixed-order torch attention): transformers' greedy tokens with pages
    released behind the window, preempted ones swapped out and back, free pages poisoned;
    bf16 (the native kernels where they built): the same tokens as with every page kept.
    Mistral: every layer windowed; Gemma 2 and gpt-oss: global and windowed layers, the
    windowed layers' pages a group of their own."""
    folder = tiny_models(variant)
    tokens, released, preempted = _released_and_poisoned(folder, dtype, True, True)
    if dtype == torch.float32:  # (transformers stops at an EOS: its tokens to there)
        want = hf_greedy(folder, random_prompts(6, 20, 40, seed=21), 24)
        tokens = [t[: len(w)] for t, w in zip(tokens, want)]
    else:
        want = _released_and_poisoned(folder, dtype, False, False)[0]
    assert tokens == want
    assert released > 0 and preempted > 0


def test_mxfp4_values_are_transformers_dequantization():
    """gpt-oss's MXFP4 experts (two e2m1 codes a byte, a power-of-two scale a 32): the
    values the loader reads equal transformers' de-quantization (its layout transposed)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gpupool.models.quantized import mxfp4_values

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 8, 4), generator=g, dtype=torch.uint8)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(mxfp4_values(blocks, scales), want)


def test_an_mxfp4_gpt_oss_checkpoint_gives_the_tokens_of_its_values(tiny_models, tmp_path):
    """The tiny gpt-oss with MXFP4 experts (blocks and scales as gpt-oss ships them, a
    quantization_config of mxfp4): greedy tokens equal transformers' on the same values
    stored plainly; the gateway's size check counts the blocks as their values, 4-bit."""
    from gpupool.models.sizes import checkpoint_element_bytes, parameter_count

    packed, plain = make_mxfp4_twins(tiny_models("gpt_oss"), tmp_path)
    assert parameter_count(packed) == parameter_count(plain)
    # kept 4-bit: the gateway counts it as a 4-bit checkpoint, not at the worker's dtype
    assert checkpoint_element_bytes(packed) == 0.75 and checkpoint_element_bytes(plain) == 0
    prompts = random_prompts(4, 5, 30, seed=23)
    want = hf_greedy(plain, prompts, 12)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = make_engine(packed)
    try:
        outs = engine.generate(prompts, params)
        assert [list(o.token_ids)[: len(w)] for o, w in zip(outs, want)] == want
        w = engine.local.core.workers["m"].model.layers[0]  # kept 4-bit, with the codebook
        assert w["experts.0.gate_up_weight"].dtype == torch.uint8
        assert w["experts.0.down_weight_gcode"].tolist() == list(quant4.E2M1)
        assert "experts.0.down_weight_goffset" not in w  # zero: none stored
    finally:
        engine.shutdown()
    # bf16 on the native 4-bit product (the codebook's values in its table): a request's
    # tokens alone are its tokens in a batch
    engine = make_engine(packed, dtype="bfloat16")
    try:
        assert engine.local.core.workers["m"].model.ops.name == "native"
        batched = [list(o.token_ids) for o in engine.generate(prompts, params)]
        assert batched == [list(engine.generate([p], params)[0].token_ids) for p in prompts]
    finally:
        engine.shutdown()


def test_an_mxfp4_checkpoint_with_an_infinite_scale_is_refused_by_name(tiny_models, tmp_path):
    """An exponent byte of 255 (MXFP4's NaN; 2^128 as read) in one expert's scales: the
    registration fails naming the tensor, and the engine keeps serving what it had."""
    from safetensors.torch import load_file, save_file

    from gpupool.models.errors import ModelLoadError

    src = tiny_models("gpt_oss")
    packed, _ = make_mxfp4_twins(src, tmp_path)
    tensors = load_file(str(packed / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name][2, 3, 0] = 255
    save_file(tensors, str(packed / "model.safetensors"))
    engine = make_engine(src)
    try:
        with pytest.raises(ModelLoadError, match="down_proj.*infinite scales"):
            engine.add_model("bad", packed)
        out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
        assert len(out[0].token_ids) == 2
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", ["mistral", "gpt_oss"])
def test_windows_and_sinks_on_the_triton_kernels_give_transformers_tokens(tiny_models,
                                                                           variant):
    """What a CUDA device runs (Triton's attention, interpreted here, fp32): a windowed
    model and gpt-oss (sinks, a window on layer 0: that layer's pages a group of their own)
    on the Triton backend, its attention called with the windows and sinks, pages behind
    the window released, give transformers' greedy tokens."""
    from gpupool.kernels import paged_attention

    folder = tiny_models(variant)
    prompts = random_prompts(4, 10, 30, seed=29)
    want = hf_greedy(folder, prompts, 10)
    seen = []
    real = paged_attention.paged_attention_decode

    def spy(*a, **k):
        seen.append((a[6], a[7] is not None))  # window, sinks
        return real(*a, **k)

    engine = make_engine(folder, kernels="triton", kv_page_bytes=4 << 10)  # 8 tokens a page
    try:
        assert engine.local.core.workers["m"].model.ops.name == "triton"
        paged_attention.paged_attention_decode = spy
        outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0,
                                                       ignore_eos=True))
        assert [list(o.token_ids)[: len(w)] for o, w in zip(outs, want)] == want
        assert (6, variant == "gpt_oss") in seen
        assert engine.local.core.scheduler.num_released_pages > 0
    finally:
        paged_attention.paged_attention_decode = real
        engine.shutdown()
