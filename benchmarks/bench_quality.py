"""What bf16, int8 and 4-bit weights cost in quality on SmolLM2-135M-Instruct, against float32.

For each of --variants (dtype, optionally +int8, +int4, +int4-g32 weights, or +q4_0: the
model's 2-D tensors quantized to GGUF Q4_0 by the gguf package and repacked as a GGUF file's
are, ``models/gguf.py``), in the same run:
- perplexity of a fixed English text (TEXT below, ~400 tokens) under the engine's own forward
  pass (every position's logits, float32 softmax), and its ratio to float32's;
- greedy agreement with float32 on the 8 fixed prompts of bench_engine (48 new tokens each):
  the share of positions whose token is identical, and the share of tokens before each
  prompt's first difference (after a difference the two continuations drift apart);
- teacher-forced decoding of the same text, one token a step through the decode path (as a
  batch-1 stream runs): the share of positions whose top token is float32's, and the mean
  KL divergence from float32's next-token distribution. Unlike greedy agreement, one near-tie
  does not decide the rest, so this is the steadier figure.
The float32 reference is the default model as shipped (a Q4_1 GGUF's exact values), so a
4-bit variant quantizes it a second time; llama.cpp's published deltas for the same formats
(``llama-quantize --help``, perplexity on wikitext-2 at Llama-3-8B, F16 6.23) are printed
beside: Q4_0 +0.4685 (+7.5%), Q4_K_M +0.1754 (+2.8%), Q8_0 +0.0026 (+0.04%).
Usage: python3 benchmarks/bench_quality.py [--json] [--variants float32,bfloat16,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import prompts  # noqa: E402
from common import cpu_flags, emit, variants  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402
from gpupool.models.batch import BatchRow  # noqa: E402

NEW_TOKENS = 48
LLAMA_CPP_PPL_DELTA = {"q4_0": 0.4685 / 6.23, "q4_k_m": 0.1754 / 6.23, "q8_0": 0.0026 / 6.23}
TEXT = (
    "The river rises in the hills north of the town and runs south for about forty miles "
    "before it meets the sea. For most of the year it is shallow enough to wade across, but "
    "in early spring, when the snow on the hills melts, it can rise by several feet in a "
    "single night. The old stone bridge in the centre of the town was built in the "
    "eighteenth century to replace a wooden one that had been washed away, and it has "
    "survived every flood since. Farmers along the valley grow wheat, barley and potatoes, "
    "and many of them keep sheep on the higher ground. The town itself has a market every "
    "Saturday, a small museum about the history of the valley, and a railway station with "
    "trains to the city every hour. In summer, visitors come to walk along the river, to "
    "fish for trout, or to climb the hills for the view of the coast. The local school has "
    "about three hundred pupils, and most of the teachers live in the town or in the "
    "villages nearby. When people are asked what they like most about living there, they "
    "usually mention the quiet streets, the friendly neighbours and the fact that the sea "
    "is only half an hour away by car. Some of the younger residents, however, say that "
    "there is not much to do in the evenings and that they would like a cinema."
)


def _pages(engine: Engine, worker, n: int) -> tuple[list[int], list[int] | None]:
    """Pages for ``n`` tokens: the model's, and its windowed layers' where they are a KV
    group of their own (else None)."""
    pool = engine.local.kv.pages
    pages = pool.allocate(-(-n // worker.block_tokens))
    group = worker.window_group
    return pages, pool.allocate(-(-n // group[0])) if group else None


def perplexity(engine: Engine, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` given the prefix, one forward pass."""
    worker = engine.local.core.workers["m"]
    worker.make_resident()
    pages, window = _pages(engine, worker, len(ids))
    try:
        row = BatchRow(token_ids=ids, start=0, pages=pages, is_decode=False, samples=True,
                       window_pages=window)
        batch = worker.batch([row])
        batch = dataclasses.replace(batch, logits_indices=torch.arange(len(ids) - 1))
        logits = worker.model.forward(batch, worker.kv_view)
    finally:
        engine.local.kv.pages.free(pages + (window or []))
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(float(nll))


def decode_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The logits after each token of ``ids``, fed one token a step as decode rows."""
    worker = engine.local.core.workers["m"]
    worker.make_resident()
    pages, window = _pages(engine, worker, len(ids))
    try:
        out = []
        for p, token in enumerate(ids):
            row = BatchRow(token_ids=[token], start=p, pages=pages, is_decode=p > 0,
                           samples=True, window_pages=window)
            out.append(worker.model.forward(worker.batch([row]), worker.kv_view))
    finally:
        engine.local.kv.pages.free(pages + (window or []))
    return torch.cat(out)


def q4_0_folder(folder: Path, dest: Path) -> Path:
    """``folder``'s model with every 2-D tensor quantized to GGUF Q4_0 (the gguf package's
    quantizer) and repacked into gpupool's 4-bit form as a converted GGUF file's is; the
    other files (tokenizer, config with its quantization_config) beside."""
    import json
    import shutil

    from gguf import GGMLQuantizationType, quantize
    from safetensors.torch import load_file, save_file

    from gpupool.models.config import INT4_PARTS, OWN_INT4, int4_quantization_config
    from gpupool.models.gguf import q4_0_to_int4

    if (dest / "model.safetensors").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in load_file(str(folder / "model.safetensors")).items():
        if t.dim() == 2 and t.shape[1] % 32 == 0:
            packed = quantize(t.float().numpy(), GGMLQuantizationType.Q4_0)
            base = name[: -len(".weight")]
            for suffix, part in zip(INT4_PARTS[OWN_INT4], q4_0_to_int4(packed, *t.shape)):
                out[base + suffix] = part.contiguous()
        else:
            out[name] = t
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = int4_quantization_config(32)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+int8,float32+int8")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = ensure_default_model(default_home())
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    texts = prompts(8)
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
              "greedy_prompts": len(texts), "greedy_new_tokens": NEW_TOKENS}
    reference = None
    result["llama_cpp_ppl_delta_at_llama3_8b"] = {
        k: round(v, 4) for k, v in LLAMA_CPP_PPL_DELTA.items()}
    for label, dtype, quant in variants(args.variants):
        model = folder
        if quant == "q4_0":
            model, quant = q4_0_folder(folder, default_home() / "bench-q4_0"), None
        engine = Engine(device="cpu", dtype=dtype, quantization=quant)
        engine.add_model("m", model)
        try:
            ids = engine.tokenize("m", TEXT)
            ppl = perplexity(engine, ids)
            forced = decode_logits(engine, ids)
            outs = [list(o.token_ids) for o in engine.generate(texts, params, model="m")]
        finally:
            engine.shutdown()
        if reference is None:
            if (dtype, quant) != ("float32", None):
                raise SystemExit("the first variant must be float32 (the reference)")
            reference = (ppl, outs, forced)
            result["text_tokens"] = len(ids)
        same = sum(a == b for x, y in zip(outs, reference[1]) for a, b in zip(x, y))
        prefix = 0
        for x, y in zip(outs, reference[1]):
            prefix += next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
        total = sum(len(x) for x in outs)
        result[f"{label}_perplexity"] = round(ppl, 3)
        result[f"{label}_perplexity_vs_float32"] = round(ppl / reference[0], 4)
        result[f"{label}_greedy_same_tokens"] = round(same / total, 3)
        result[f"{label}_greedy_same_prefix"] = round(prefix / total, 3)
        ref_lp, lp = reference[2].log_softmax(-1), forced.log_softmax(-1)
        top1 = (forced.argmax(-1) == reference[2].argmax(-1)).float().mean()
        result[f"{label}_forced_same_top1"] = round(float(top1), 4)
        result[f"{label}_forced_mean_kl"] = round(
            float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()), 5)
    emit(result, args.json)


if __name__ == "__main__":
    main()
