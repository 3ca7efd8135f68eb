"""Gemma and sliding-window models on the native CPU kernels against the torch ops (issue 34).

Random models (bf16, made once under ``$GPUPOOL_HOME/bench-families``; a vocabulary of
32000 so the layers, not the head, are what is timed):
  gemma3    Gemma 3 270M's layer shape (hidden 640, 18 layers, 4 heads, 1 KV head, head_dim
            256, intermediate 2048), 5 local layers (window 512) to 1 global, q/k norms
  gemma2    the same shape as Gemma 2: a window of 512 on every other layer, soft caps of
            the scores (50) and of the logits (30)
  mistral   SmolLM2's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536)
            as a Mistral with a sliding window of 256 on every layer
  gpt_oss   a small gpt-oss (hidden 512, 12 layers, 8 heads of 64, 2 KV heads, 8 experts of
            512, 2 a token, windows of 128 on every other layer; not in the default set)
Each is served by an engine on the native kernels (``native=True``: before this change Gemma
ran on the torch ops, and a windowed Mistral was capped at its window) and by one on the
torch ops (``native=False``, the fixed-order ops: both batch invariant), one engine at a
time, --rounds rounds alternating. Timed: time to first token of a 1000-token prompt, and
decode tokens/s at batch 1 and 8 (prompts of 600 tokens, past the windows, prefilled by a
call before and found in the prefix cache; 32 new tokens, greedy). Medians and ranges;
native over torch.

--kv: the windowed Mistral's KV memory instead. 12 requests of 1000-token prompts and 96 new
tokens (greedy) at once, on the native kernels, in a KV pool of 3 requests' whole contexts:
pages behind every layer's window released (this change) against every page kept (the
scheduler told the model has no window: the same kernels and bits). Timed: the whole run's
tokens/s; counted: preemptions, the most requests running at once, pages released.
``--kv --models gemma3``: the same for the Gemma 3 shape (5 windowed layers of 6, a window
of 512, prompts of 3000 tokens, up to 1024 prompt tokens a step beside decoding streams so
the pool limits how many run): its windowed layers' pages, a KV group of their own,
released behind the window, against the same groups with a window no block is ever behind
(every page kept, as when one page list held all layers).
--mxfp4: a wider gpt-oss (hidden 1024, 12 layers, 32 experts of 1024, 2 a token) with its
experts as gpt-oss ships them (MXFP4: e2m1 codes, a power-of-two scale per 32; quantized
from the random bf16 weights) against the same values stored bf16, both on the native
kernels: the weights' bytes, time to first token and decode tokens/s as above (MXFP4 kept
4-bit: the 4-bit product with the e2m1 codebook); and MXFP4
with its experts run as the model's loop of products (``mxfp4_loop``: gpt-oss's path before
its biases and clamped SwiGLU went into the one native experts call).
--whole-step: decode on the native kernels in one call a step (``native.decode_layers``)
against the same kernels op by op (the call turned off), per model (default ``qwen3``: Qwen3
0.6B's layer shape, whose heads' q and k norms the call takes; ``gemma3``, ``gemma2``):
decode tokens/s at batch 1 and 8 as above but of decode steps only: prompts of whole pages
of the model's global layers and one token (600 rounded up: a cache hit on 600 tokens of
Gemma 3's shape, whose global layers' pages hold 340 tokens, skips 340, and the rest is
prefilled a few dozen tokens a step beside the decoding rows, most of the run's time), the
one call over op by op.
Usage: python3 benchmarks/bench_families.py [--json] [--rounds 3] [--models gemma3,mistral]
       python3 benchmarks/bench_families.py --kv [--json] [--rounds 3] [--models gemma3]
       python3 benchmarks/bench_families.py --mxfp4 [--json] [--rounds 3]
       python3 benchmarks/bench_families.py --whole-step [--json] [--rounds 3] [--models qwen3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit, engine_threads  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402

GEMMA = {"vocab_size": 32000, "hidden_size": 640, "intermediate_size": 2048,
         "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
         "head_dim": 256, "max_position_embeddings": 4096, "query_pre_attn_scalar": 256,
         "sliding_window": 512, "tie_word_embeddings": True, "bos_token_id": 1,
         "eos_token_id": 2}
MODELS = {
    "gemma3": ("Gemma3TextConfig", {**GEMMA, "layer_types": [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]}),
    "gemma2": ("Gemma2Config", {**GEMMA, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0}),
    "mistral": ("MistralConfig", {"vocab_size": 32000, "hidden_size": 576,
                                  "intermediate_size": 1536, "num_hidden_layers": 30,
                                  "num_attention_heads": 9, "num_key_value_heads": 3,
                                  "max_position_embeddings": 4096, "sliding_window": 256,
                                  "tie_word_embeddings": True, "bos_token_id": 1,
                                  "eos_token_id": 2}),
    # a small gpt-oss: sinks, biases, windows of 128 on every other layer, 8 experts (2 a
    # token) with the clamped SwiGLU, YaRN
    "gpt_oss": ("GptOssConfig", {"vocab_size": 32000, "hidden_size": 512,
                                 "intermediate_size": 512, "num_hidden_layers": 12,
                                 "num_attention_heads": 8, "num_key_value_heads": 2,
                                 "head_dim": 64, "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "sliding_window": 128,
                                 "max_position_embeddings": 4096, "bos_token_id": 1,
                                 "eos_token_id": 2}),
}
# --whole-step's: Qwen3 0.6B's layer shape (each head's q and k norms)
MODELS["qwen3"] = ("Qwen3Config", {"vocab_size": 32000, "hidden_size": 1024,
                                   "intermediate_size": 3072, "num_hidden_layers": 28,
                                   "num_attention_heads": 16, "num_key_value_heads": 8,
                                   "head_dim": 128, "max_position_embeddings": 4096,
                                   "tie_word_embeddings": True, "bos_token_id": 1,
                                   "eos_token_id": 2})
# --mxfp4's: wider, with 32 experts (1.2 G expert parameters, 2 of 32 a token), so a decode
# step's expert bytes, not the head's, dominate its reads
MODELS["gpt_oss_wide"] = ("GptOssConfig", {**MODELS["gpt_oss"][1], "hidden_size": 1024,
                                           "intermediate_size": 1024, "head_dim": 128,
                                           "num_local_experts": 32})


def _make(folder: Path, kind: str) -> Path:
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    cls, fields = MODELS[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls)(**fields)).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    return folder


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n, length), generator=g).tolist()


def _to_mxfp4(w):
    """MXFP4 (blocks [..., C / 32, 16], scales [..., C / 32]) of ``w`` [..., C]: each 32's
    scale the power of two that brings its largest magnitude to at most 6, each value the
    nearest e2m1 code."""
    import torch

    from gpupool.kernels import quant4

    b = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    e = torch.ceil(torch.log2(b.abs().amax(-1).clamp_min(2.0**-100) / 6)).clamp(-126, 127)
    v = b / torch.exp2(e)[..., None]
    mags = torch.tensor(quant4.E2M1[:8])
    code = (v.abs()[..., None] - mags).abs().argmin(-1) + 8 * (v < 0)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (e + 127).to(torch.uint8)


def _make_mxfp4(root: Path) -> tuple[Path, Path]:
    """(the small gpt-oss with MXFP4 experts, the same values stored bf16), made once."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from gpupool.models.quantized import mxfp4_values

    packed, plain = root / "gpt_oss_mxfp4", root / "gpt_oss_mxfp4_values"
    if (packed / "config.json").is_file() and (plain / "config.json").is_file():
        return packed, plain
    src = _make(root / "gpt_oss_wide", "gpt_oss_wide")
    for d in (packed, plain):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
    tensors = load_file(str(src / "model.safetensors"))
    quantized = dict(tensors)
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        blocks, scales = _to_mxfp4(tensors[name].transpose(1, 2))  # [E, out, in]: by rows
        tensors[name] = mxfp4_values(blocks, scales).transpose(1, 2).to(torch.bfloat16)
        del quantized[name]
        quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(plain / "model.safetensors"),
              metadata={"format": "pt"})
    save_file(quantized, str(packed / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps(
        {**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    return packed, plain


def _measure(folder: Path, native: bool, threads: int,
             steps_only: bool = False) -> dict[str, float]:
    # the prefix cache on: a decode run's prompts were prefilled by the call before it, so
    # its time is the decode steps' (the 1000-token prompt is new: a whole prefill)
    # the weight region set (its default, 30% of the memory free when the engine starts,
    # can fall below the 2.5 GB bf16 gpt-oss after another engine's run in this process)
    engine = Engine(device="cpu", dtype="bfloat16", native=native, threads=threads,
                    enable_prefix_caching=True, weight_bytes=4 << 30)
    try:
        engine.add_model("m", str(folder))
        out = {"weight_mib": engine.local.weights.entries["m"].layout.num_bytes / 2**20}
        first = SamplingParams(max_tokens=1, temperature=0)
        engine.generate(_prompts(1, 64, 0), first)  # warm: weights resident, kernels
        long = _prompts(1, 1000, 1)
        start = time.perf_counter()
        engine.generate(long, first)
        out["ttft_1000_ms"] = (time.perf_counter() - start) * 1e3
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        length = 600
        if steps_only:  # whole cached pages and one token: the steps decode only
            bt = engine.local.core.scheduler.block_tokens["m"]
            length = -(-length // bt) * bt + 1
        for batch in (1, 8):
            prompts = _prompts(batch, length, 2 + batch)
            engine.generate(prompts, first)  # the prefill, outside the decode's time
            start = time.perf_counter()
            engine.generate(prompts, params)
            out[f"decode_b{batch}_tok_s"] = batch * 32 / (time.perf_counter() - start)
        return out
    finally:
        engine.shutdown()


# --kv's requests (prompt, new tokens): far past the windows (256; Gemma 3's 512); and the
# prompt tokens a step may compute while others decode (None: from the TBT SLO, the
# default; Gemma 3's 1024: not held back for the running streams, so the pool, not the
# SLO, limits how many run at once)
KV_LENGTHS = {"mistral": (1000, 96, None), "gemma3": (3000, 96, 1024)}


def _measure_kv(folder: Path, kind: str, release: bool, threads: int) -> dict[str, float]:
    from gpupool.models.config import ModelConfig

    cfg = ModelConfig.from_folder(folder)
    per_token = cfg.kv_bytes_per_token(2)
    prompt, new, cap = KV_LENGTHS[kind]
    engine = Engine(device="cpu", dtype="bfloat16", threads=threads,
                    enable_prefix_caching=False,
                    kv_cache_bytes=3 * (prompt + new) * per_token,
                    max_prefill_tokens_while_decoding=cap)
    try:
        engine.add_model("m", str(folder))
        engine.generate(_prompts(1, 64, 0), SamplingParams(max_tokens=1, temperature=0))
        scheduler = engine.local.core.scheduler
        if not release:
            scheduler.windows["m"] = 0
            if "m" in scheduler.window_groups:  # a window no block is ever behind
                scheduler.window_groups["m"] = (scheduler.window_groups["m"][0], 1 << 30)
        most, step = 0, scheduler.schedule

        def counting(now=None):  # the most sequences running at once
            nonlocal most
            out = step(now)
            most = max(most, len(scheduler.running["m"]))
            return out

        scheduler.schedule = counting
        before = (scheduler.num_preemptions, scheduler.num_released_pages)
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        engine.generate(_prompts(12, prompt, 7), params)
        seconds = time.perf_counter() - start
        return {"tok_s": 12 * new / seconds,
                "preemptions": scheduler.num_preemptions - before[0], "most_running": most,
                "released_pages": scheduler.num_released_pages - before[1]}
    finally:
        engine.shutdown()


def main_kv(args, threads: int) -> None:
    kind = args.models if args.models in KV_LENGTHS else "mistral"
    folder = _make(default_home() / "bench-families" / kind, kind)
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for mode in ("released", "kept"):
            for key, value in _measure_kv(folder, kind, mode == "released", threads).items():
                runs.setdefault(mode, {}).setdefault(key, []).append(value)
    result: dict = {"cpu": cpu_flags(), "threads": threads, "rounds": args.rounds,
                    "model": kind, "prompt_new_tokens": KV_LENGTHS[kind][:2]}
    for mode, got in runs.items():
        result[mode] = {k: [round(statistics.median(v), 1), round(min(v), 1),
                            round(max(v), 1)] for k, v in got.items()}
    result["released_over_kept_tok_s"] = round(statistics.median(runs["released"]["tok_s"])
                                               / statistics.median(runs["kept"]["tok_s"]), 2)
    emit(result, args.json)


def main_mxfp4(args, threads: int) -> None:
    packed, plain = _make_mxfp4(default_home() / "bench-families")
    runs: dict[str, dict[str, list[float]]] = {}
    from bench_moe import experts_loop

    for _ in range(args.rounds):
        for kind, folder in (("mxfp4", packed), ("bf16", plain), ("mxfp4_loop", packed)):
            with experts_loop(kind.endswith("_loop")):
                got = _measure(folder, True, threads)
            for key, value in got.items():
                runs.setdefault(kind, {}).setdefault(key, []).append(value)
    result: dict = {"cpu": cpu_flags(), "threads": threads, "rounds": args.rounds}
    for kind, got in runs.items():
        result[kind] = {k: [round(statistics.median(v), 1), round(min(v), 1),
                            round(max(v), 1)] for k, v in got.items()}
    mid = {k: {m: statistics.median(v) for m, v in got.items()} for k, got in runs.items()}
    result["mxfp4_over_bf16"] = {
        "weight_bytes": round(mid["mxfp4"]["weight_mib"] / mid["bf16"]["weight_mib"], 2),
        "ttft_1000": round(mid["bf16"]["ttft_1000_ms"] / mid["mxfp4"]["ttft_1000_ms"], 2),
        **{f"decode_b{b}": round(mid["mxfp4"][f"decode_b{b}_tok_s"]
                                 / mid["bf16"][f"decode_b{b}_tok_s"], 2) for b in (1, 8)}}
    result["one_call_over_loop"] = {
        "ttft_1000": round(mid["mxfp4_loop"]["ttft_1000_ms"] / mid["mxfp4"]["ttft_1000_ms"], 2),
        **{f"decode_b{b}": round(mid["mxfp4"][f"decode_b{b}_tok_s"]
                                 / mid["mxfp4_loop"][f"decode_b{b}_tok_s"], 2) for b in (1, 8)}}
    emit(result, args.json)


@contextlib.contextmanager
def _per_op(on: bool):
    """The native backend's decode steps op by op (its whole-step call turned off)."""
    from gpupool.kernels.backend import NativeOps

    real = NativeOps.decode_step
    if on:
        NativeOps.decode_step = lambda self, *a, **k: None
    try:
        yield
    finally:
        NativeOps.decode_step = real


def main_whole_step(args, threads: int) -> None:
    kinds = args.models.split(",")
    folders = {k: _make(default_home() / "bench-families" / k, k) for k in kinds}
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            for mode in ("one_call", "per_op"):
                with _per_op(mode == "per_op"):
                    got = _measure(folders[kind], True, threads, steps_only=True)
                for key, value in got.items():
                    runs.setdefault(f"{kind}_{mode}", {}).setdefault(key, []).append(value)
    result: dict = {"cpu": cpu_flags(), "threads": threads, "rounds": args.rounds}
    for name, got in runs.items():
        result[name] = {k: [round(statistics.median(v), 1), round(min(v), 1),
                            round(max(v), 1)] for k, v in got.items()}
    for kind in kinds:
        one, per = runs[f"{kind}_one_call"], runs[f"{kind}_per_op"]
        result[f"{kind}_one_call_over_per_op"] = {
            f"decode_b{b}": round(statistics.median(one[f"decode_b{b}_tok_s"])
                                  / statistics.median(per[f"decode_b{b}_tok_s"]), 2)
            for b in (1, 8)}
    emit(result, args.json)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="gemma3,gemma2,mistral")
    ap.add_argument("--kv", action="store_true", help="the windowed model's KV memory")
    ap.add_argument("--mxfp4", action="store_true", help="gpt-oss's MXFP4 experts, kept 4-bit")
    ap.add_argument("--whole-step", action="store_true",
                    help="decode in one native call against op by op (default model qwen3)")
    args = ap.parse_args()
    if args.whole_step:
        if args.models == ap.get_default("models"):
            args.models = "qwen3"
        return main_whole_step(args, engine_threads())
    if args.kv:
        return main_kv(args, engine_threads())
    if args.mxfp4:
        return main_mxfp4(args, engine_threads())
    root = default_home() / "bench-families"
    kinds = args.models.split(",")
    folders = {k: _make(root / k, k) for k in kinds}
    runs: dict[str, dict[str, list[float]]] = {}
    threads = engine_threads()  # (once: it leaves this thread one)
    for _ in range(args.rounds):
        for kind in kinds:
            for backend in ("native", "torch"):
                got = _measure(folders[kind], backend == "native", threads)
                for key, value in got.items():
                    runs.setdefault(f"{kind}_{backend}", {}).setdefault(key, []).append(value)
    result: dict = {"cpu": cpu_flags(), "threads": threads, "rounds": args.rounds}
    for kind in kinds:
        for backend in ("native", "torch"):
            result[f"{kind}_{backend}"] = {
                k: [round(statistics.median(v), 1), round(min(v), 1), round(max(v), 1)]
                for k, v in runs[f"{kind}_{backend}"].items()}
        nat, tor = runs[f"{kind}_native"], runs[f"{kind}_torch"]
        result[f"{kind}_native_over_torch"] = {
            "ttft_1000": round(statistics.median(tor["ttft_1000_ms"])
                               / statistics.median(nat["ttft_1000_ms"]), 2),
            **{f"decode_b{b}": round(statistics.median(nat[f"decode_b{b}_tok_s"])
                                     / statistics.median(tor[f"decode_b{b}_tok_s"]), 2)
               for b in (1, 8)}}
    emit(result, args.json)


if __name__ == "__main__":
    main()
