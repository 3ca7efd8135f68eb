"""Factories for tests: tiny random Llama-family models with a word-level tokenizer, and
engines wired to them."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

VOCAB_SIZE = 160
EOS_ID = 2

VARIANTS = {
    # name: (transformers config class, extra config)
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    # attention_bias: q, k, v and o_proj biases (o_proj's was not read before gpt-oss)
    "llama_bias": ("LlamaConfig", {"attention_bias": True}),
    "llama3_rope": ("LlamaConfig", {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32},
    }),
    # every layer sees its last 6 keys only (the parity prompts are longer)
    "mistral": ("MistralConfig", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    # Qwen2's sliding window from max_window_layers on: layer 0 global, layer 1 its last 6
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 6,
                                     "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # YaRN (Qwen3's long context), its original context 16 (the parity prompts are longer)
    "qwen3_yarn": ("Qwen3Config", {"head_dim": 32, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16}}),
    # Phi-3.5-style: fused qkv/gate_up checkpoint, LongRoPE (its long factors from position
    # 128, past the parity prompts: transformers recomputes a sequence that crosses it,
    # tests/test_families.py)
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 128, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.5 + 0.4 * i for i in range(8)]}}),
    # Gemma 2: layer 0 sees the last 8 keys only (the parity prompts are longer), soft caps
    # (untied: a tiny random tied Gemma repeats one token)
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8,
                                "query_pre_attn_scalar": 24, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0,
                                "tie_word_embeddings": False}),
    # Gemma 3: q/k norms, the window layers' own rope base, the global one's linear scaling
    "gemma3": ("Gemma3TextConfig", {
        "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
        "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": False,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # Gemma 3's pattern in small: 3 windowed layers, then a global one (their KV groups'
    # pages hold 5 and 15 tokens in 4 KiB)
    "gemma3_wide": ("Gemma3TextConfig", {
        "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24,
        "num_hidden_layers": 4, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}),
    # mixtures of experts: 4 experts, 2 a token
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "head_dim": 16,
                                     "norm_topk_prob": True, "mlp_only_layers": [1]}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 4.0}),
    # gpt-oss: attention sinks, biases, layer 0 sees its last 6 keys, YaRN, 4 experts with
    # biases, 2 a token by the softmax of their top logits, clamped SwiGLU
    "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                 "head_dim": 16, "sliding_window": 6, "rope_parameters": {
                                     "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 16}}),
    # three of six experts a token: a row's sum of more than two outputs
    "qwen3_moe_k3": ("Qwen3MoeConfig", {"num_experts": 6, "num_experts_per_tok": 3,
                                        "moe_intermediate_size": 32, "head_dim": 16,
                                        "norm_topk_prob": True}),
    # Phi-4-mini-style: a quarter of each head does not rotate, tied embeddings
    "phi3_partial": ("Phi3Config", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                                    "original_max_position_embeddings": 128, "rope_scaling": {
                                        "type": "longrope",
                                        "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                        "long_factor": [2.0 + 0.3 * i for i in range(6)]}}),
}


def make_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over words w0..wN, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS_ID}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(folder))


def make_tiny_model(folder: Path, variant: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model of ``variant`` (see VARIANTS) with a tokenizer; return folder.

    initializer_range=0.5 keeps the top logits apart (STYLE.md: greedy parity on 0.02-scale
    random models is decided by 1e-4 ties). Norm weights and biases are randomised too, so
    a wrongly mapped norm or bias changes the output.
    """
    import transformers

    cls_name, extra = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "initializer_range": 0.5, "eos_token_id": EOS_ID,
        "bos_token_id": 1, "pad_token_id": 0, **extra})  # (a variant may name other sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, run alone (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return hf_greedy_with(model, prompts, max_new_tokens)


def hf_greedy_with(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``hf_greedy`` with a transformers model already loaded."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False,
                               attention_mask=torch.ones_like(x), pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


def hf_gap_in_ulps(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """The largest shortfall, over every generated position, of the logit transformers gives
    our token below its own best (teacher-forced on our tokens), in units of the bf16 spacing
    at that best: 0 where we picked its argmax, 1 for a tie one rounding apart."""
    worst = 0.0
    for ids, out in zip(prompts, outputs):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float()
        best = logits.max(-1).values
        spacing = 2.0 ** (torch.floor(torch.log2(best.abs())) - 7)  # bf16: 8 mantissa bits
        ours = logits[torch.arange(len(out)), torch.tensor(out)]
        worst = max(worst, ((best - ours) / spacing).max().item())
    return worst


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """n token-id prompts of lengths in [lo, hi], avoiding special ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB_SIZE, (k,), generator=g).tolist() for k in lengths]


def make_engine(folder: Path | None = None, name: str = "m", **overrides):
    """A CPU engine with a small KV pool (override any Config/PoolConfig/SchedulerConfig field)."""
    from gpupool import Engine

    # token-comparing tests pin float32 (dtype "auto" is the speed-issue's choice to make)
    opts = {"kv_cache_bytes": 4 << 20, "kv_page_bytes": 16 << 10, "dtype": "float32",
            **overrides}
    engine = Engine(device="cpu", **opts)
    if folder is not None:
        engine.add_model(name, folder)
    return engine


def make_mxfp4_twins(src: Path, dest: Path) -> tuple[Path, Path]:
    """(gpt-oss ``src`` with its experts as MXFP4 blocks and scales, random codes and scales
    near 1, as gpt-oss ships them; the same model with those values stored plainly), under
    ``dest``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from gpupool.models.quantized import mxfp4_values

    plain, packed = dest / "plain", dest / "mxfp4"
    shutil.copytree(src, plain)
    shutil.copytree(src, packed)
    tensors = load_file(str(src / "model.safetensors"))
    quantized = dict(tensors)
    g = torch.Generator().manual_seed(5)
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        e, cols, rows = tensors[name].shape  # stored [E, in, out]; blocks are [E, out, ...]
        blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g,
                               dtype=torch.uint8)
        scales = torch.randint(124, 127, (e, rows, cols // 32), generator=g,
                               dtype=torch.uint8)
        tensors[name] = mxfp4_values(blocks, scales).transpose(1, 2).contiguous()
        del quantized[name]
        quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
    save_file(tensors, str(plain / "model.safetensors"))
    save_file(quantized, str(packed / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps(
        {**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    return packed, plain


def make_peft_adapter(base_folder: Path, out: Path, rank: int, targets: list[str],
                      alpha: float | None = None, rslora: bool = False, seed: int = 0,
                      **extra) -> Path:
    """A PEFT LoRA adapter of ``base_folder`` with random (non-zero) A and B, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets,
                     use_rslora=rslora, init_lora_weights=False, **extra)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # larger B than peft's default so each adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(out))
    return out


def peft_greedy(base_folder: Path, adapters: dict[str, Path], prompts: list[list[int]],
                names: list[str | None], max_new_tokens: int) -> list[list[int]]:
    """peft's greedy continuation of each prompt with its adapter active (None: base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    items = list(adapters.items())
    model = PeftModel.from_pretrained(base, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(str(path), adapter_name=name)
    model.eval()
    out = []
    for ids, name in zip(prompts, names):
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                               adapter_names=[name or "__base__"])
        out.append(y[0, len(ids):].tolist())
    return out


def adapters_greedy(engine, base: str, paths: dict, prompts: list, names: list,
                    max_tokens: int) -> list[list[int]]:
    """The engine's greedy tokens of each prompt with its adapter (None: the base model
    ``base``), the adapters in ``paths`` registered first."""
    from gpupool import SamplingParams

    for name, path in paths.items():
        engine.add_adapter(name, base, path)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0),
                           model=[n or base for n in names])
    return [list(o.token_ids) for o in outs]


def engine_alone(folder: Path, prompts: list, params) -> list[list[int]]:
    """Token ids of ``prompts`` on an engine serving only the model in ``folder``."""
    engine = make_engine(folder)
    try:
        return [list(o.token_ids) for o in engine.generate(prompts, params)]
    finally:
        engine.shutdown()


def generate_interleaved(engine, prompts: dict[str, list], params):
    """Token ids per model when each model's prompts are sent from its own thread at once,
    and for one call that mixes every model's prompts in one list (in ``prompts`` order)."""
    results = {}

    def run(model):
        results[model] = engine.generate(prompts[model], params, model=model)

    threads = [threading.Thread(target=run, args=(m,)) for m in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    mixed = engine.generate([p for m in prompts for p in prompts[m]], params,
                            model=[m for m in prompts for _ in prompts[m]])
    per_model = {m: [list(o.token_ids) for o in results[m]] for m in prompts}
    return per_model, [list(o.token_ids) for o in mixed]


class DeltaLog:
    """An EngineCore's output deltas joined per request: ``tokens[rid]`` every output token
    so far, ``final[rid]`` the final delta. Checks that each delta starts where the last
    one ended."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.final: dict = {}

    def add(self, deltas) -> list:
        """Record ``deltas``; returns the final ones among them."""
        done = []
        for d in deltas:
            have = self.tokens.setdefault(d.request_id, [])
            assert d.index == len(have), (d.index, len(have))
            have.extend(d.token_ids)
            if d.finished:
                self.final[d.request_id] = d
                done.append(d)
        return done


def make_byte_model(folder: Path, smollm2_path: Path, seed: int = 0, max_len: int = 512,
                    chat_template: str | None = None, extra_tokens: tuple = ()) -> Path:
    """A tiny random Llama (2 layers, 64 wide) with SmolLM2's byte-level tokenizer and
    vocabulary (49152), for output that must spell JSON or tool calls (the word-level test
    tokenizer has no '{', '"' or digits); ``chat_template`` replaces SmolLM2's;
    ``extra_tokens`` are added to the vocabulary (ids 49152, 49153, ...: ``<think>``)."""
    import json
    import shutil

    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152 + len(extra_tokens), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_len,
        initializer_range=0.5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    for f in smollm2_path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    if chat_template is not None:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(
            json.dumps({**tc, "chat_template": chat_template}))
    if extra_tokens:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok.add_tokens(list(extra_tokens))
        tok.save_pretrained(str(folder))
    return folder


def lora_pages(widths: dict[str, int], adapters: dict[str, tuple], g: torch.Generator,
               dtype=torch.float32, mirror: bool = False, page_bytes: int = 4096,
               exact_in_bf16: bool = False, transform=None):
    """One layer's adapters ``adapters`` (name -> (rank, targets)) with random weights, made
    resident in pages of a page pool of their own whose free list is shuffled (so each
    adapter's pages are scattered and out of order; small pages: an adapter spans several),
    as ``adapters.paged.AdapterPages`` lays them out; widths: "hidden", "q", "kv", "inter".
    ``exact_in_bf16``: weights bf16 holds exactly; ``transform``: applied to every weight
    (abs, for magnitudes). Returns (the AdapterPages, the page tables)."""
    import random
    from types import SimpleNamespace

    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.paged import AdapterPages, target_groups
    from gpupool.pool.pages import PagePool

    cfg = SimpleNamespace(num_layers=1, hidden_size=widths["hidden"], q_size=widths["q"],
                          kv_size=widths["kv"], intermediate_size=widths["inter"])
    weights = {}
    for name, (rank, targets) in adapters.items():
        w = {}
        for fan_in, projs in GROUPS.values():
            for proj, fan_out in projs:
                a = torch.randn(rank, widths[fan_in], generator=g)
                b = torch.randn(widths[fan_out], rank, generator=g)
                if proj in targets:
                    w[0, proj] = (a, b)
        if exact_in_bf16:
            w = {k: tuple(t.to(torch.bfloat16).float() for t in ab) for k, ab in w.items()}
        if transform is not None:
            w = {k: tuple(transform(t) for t in ab) for k, ab in w.items()}
        weights[name] = w
    groups = set().union(*(target_groups(t) for _, t in adapters.values()))
    pool = PagePool(256)
    random.Random(0).shuffle(pool._free)
    memory = torch.zeros(256, page_bytes, dtype=torch.uint8)
    paged = AdapterPages(cfg, groups, dtype, pool, memory, "m", mirror=mirror)
    for name, (rank, _) in adapters.items():
        paged.add(name, rank, lambda w=weights[name]: w)
    tables = paged.ensure(list(adapters))
    return paged, tables
