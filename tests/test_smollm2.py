"""The real default model (SmolLM2-135M-Instruct) against transformers, token for token."""

import pytest
import torch

from gpupool import SamplingParams
from gpupool.default_model import gguf_path
from tests.factories import adapters_greedy, hf_greedy_with, make_engine

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Translate to French: Good morning, how are you today? My name is",
    "A haiku about autumn:",
    "In machine learning, overfitting means",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gguf_model():
    """transformers reading the GGUF file itself (it needs accelerate, a dev dependency): the
    reference that gpupool's own conversion is checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)


@pytest.fixture(scope="module")
def reference(gguf_model):
    model, tok = gguf_model
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return ids, hf_greedy_with(model, ids, NEW_TOKENS)


def test_conversion_equals_transformers_gguf_loading(smollm2_path, gguf_model):
    """Every converted tensor is bit-equal to what transformers de-quantizes from the file, and
    the saved tokenizer and chat template tokenize as the GGUF one does."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model, gguf_tok = gguf_model
    want = model.state_dict()
    got = load_file(str(smollm2_path / "model.safetensors"))
    assert model.config.tie_word_embeddings and "lm_head.weight" not in got
    assert set(got) == set(want) - {"lm_head.weight"}
    assert [k for k in got if not torch.equal(got[k], want[k])] == []
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    messages = [{"role": "user", "content": "Héllo ```py\nx = 1``` 42!"}]
    assert tok.chat_template == gguf_tok.chat_template
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert (tok.eos_token_id, tok.bos_token_id) == (gguf_tok.eos_token_id, gguf_tok.bos_token_id)


def test_batch_matches_transformers(smollm2_path, reference):
    ids, want = reference
    engine = make_engine(smollm2_path, kv_cache_bytes=64 << 20, kv_page_bytes=1 << 20)
    try:
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        assert [list(o.token_ids) for o in outs] == want
        tok = engine.tokenizer("m")
        assert outs[0].text == tok.decode(want[0], skip_special_tokens=True)
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_arrivals_and_preemption_match_transformers(smollm2_path, reference):
    from gpupool.config import SchedulerConfig
    from gpupool.engine.core import EngineCore
    from gpupool.messages.types import EngineRequest
    from gpupool.models.loaded import LoadedModel
    from gpupool.pool.kv import KVStorage
    from tests.factories import DeltaLog

    ids, want = reference
    # 4 tokens of SmolLM2 (46080 B each in fp32) per page; 24 pages hold 96 tokens, far less
    # than 9 requests of up to 47 tokens: sequences are preempted and recomputed.
    kv = KVStorage(24, 4 * 46080, "cpu")
    core = EngineCore(SchedulerConfig(max_num_batched_tokens=64), kv.pages)
    core.add_worker(LoadedModel("m", smollm2_path, torch.device("cpu"), kv, torch.float32))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    arrivals = {0: [0, 1, 2], 2: [3], 5: [4, 5], 9: [6, 7, 8]}
    finals, step, seqs, log = {}, 0, [], DeltaLog()
    while core.has_work() or arrivals:
        for i in arrivals.pop(step, []):
            core.enqueue(EngineRequest(str(i), "m", ids[i], params))
            seqs.append(core.requests[str(i)].seq)
        for out in log.add(core.step()):
            finals[int(out.request_id)] = log.tokens[out.request_id]
        core.check_integrity()
        step += 1
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [finals[i] for i in range(len(PROMPTS))] == want
    assert kv.pages.num_used_pages == 0


def test_lora_adapters_match_peft(smollm2_path, reference, tmp_path):
    """SmolLM2 with 4 adapters of different ranks and targets in one batch with base rows."""
    from tests.factories import make_peft_adapter, peft_greedy

    ids, base_want = reference
    specs = {"r4": (4, ["q_proj", "v_proj"]), "r8": (8, ["o_proj", "down_proj"]),
             "r16": (16, ["gate_proj", "up_proj", "k_proj"]),
             "r64": (64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"])}
    paths = {n: make_peft_adapter(smollm2_path, tmp_path / n, r, t, seed=i)
             for i, (n, (r, t)) in enumerate(specs.items())}
    names = [None, "r4", "r8", "r16", "r64", None, "r64", "r4"]
    prompts = ids[: len(names)]
    want = peft_greedy(smollm2_path, paths, prompts, names, 12)
    assert sum(w != b[:12] for w, b, n in zip(want, base_want, names) if n) >= 4
    # the adapters' pages share the KV pool (r64 on every projection: 79 MB in fp32)
    engine = make_engine(smollm2_path, name="base", kv_cache_bytes=256 << 20,
                         kv_page_bytes=1 << 20, max_lora_rank=64)
    try:
        assert adapters_greedy(engine, "base", paths, prompts, names, 12) == want
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_interleaved_with_tiny_models_in_a_one_model_arena(smollm2_path, reference,
                                                          tiny_models):
    """SmolLM2 and two tiny models through an arena whose weight region holds SmolLM2 only."""
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout
    from tests.factories import engine_alone, random_prompts

    ids, want = reference
    nbytes = build_layout(ModelConfig.from_folder(smollm2_path), torch.float32).num_bytes
    tiny = {v: random_prompts(3, 4, 20, seed=30 + i) for i, v in enumerate(("llama", "qwen3"))}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    tiny_want = {v: engine_alone(tiny_models(v), prompts, params) for v, prompts in tiny.items()}
    engine = make_engine(weight_bytes=nbytes, kv_cache_bytes=64 << 20, kv_page_bytes=1 << 20)
    try:
        engine.add_model("smol", smollm2_path)
        for v in tiny:
            engine.add_model(v, tiny_models(v))
        names = ["smol", "llama", "smol", "qwen3", "llama", "smol", "qwen3", "llama", "qwen3"]
        queues = {"smol": list(range(3)), "llama": [0, 1, 2], "qwen3": [0, 1, 2]}
        prompts, expected = [], []
        for n in names:
            i = queues[n].pop(0)
            prompts.append(ids[i] if n == "smol" else tiny[n][i])
            expected.append(want[i] if n == "smol" else tiny_want[n][i])
        outs = engine.generate(prompts, params, model=names)
        assert [list(o.token_ids) for o in outs] == expected
        w = engine.local.weights
        assert w.num_swaps + w.prefetch_hits >= 3  # copied in, waited for or prefetched
        engine.check_integrity()
    finally:
        engine.shutdown()
