"""Output tokens/s of gpupool's engine vs transformers ``generate`` on SmolLM2-135M-Instruct.

Same run, same prompts (mixed lengths), 64 new tokens per prompt, greedy. Both sides produce
exactly 64 tokens per prompt (the engine with ignore_eos, transformers with
min_new_tokens=max_new_tokens), so they do the same work. transformers runs a batch with left
padding, as its docs recommend. Each figure is the median of --runs timed runs after one
warm-up. Usage: python3 benchmarks/bench_engine.py [--json] [--runs 3]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, median_seconds  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402

NEW_TOKENS = 64
BASE = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that moves across it at night.",
    "def quicksort(arr):",
    "Explain in simple words why the sky is blue, and why sunsets are red.",
    "List three fruits:",
    "Once upon a time, in a kingdom ruled by a wise old queen who loved puzzles, a young "
    "girl found a strange map hidden inside a book in the royal library. The map showed",
    "Translate to German: I would like a cup of coffee, please.",
    "The main causes of the French Revolution were",
]


def prompts(n: int) -> list[str]:
    return [BASE[i % len(BASE)] + ("" if i < len(BASE) else f" (variant {i})") for i in range(n)]


def bench_engine(engine: Engine, batch: list[str], runs: int) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    def run():
        outs = engine.generate(batch, params)
        assert all(len(o.token_ids) == NEW_TOKENS for o in outs)

    return len(batch) * NEW_TOKENS / median_seconds(run, runs)


def bench_transformers(model, tok, batch: list[str], runs: int) -> float:
    enc = tok(batch, return_tensors="pt", padding=True)

    def run():
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS

    return len(batch) * NEW_TOKENS / median_seconds(run, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_default_model(default_home())
    engine = Engine(device="cpu")
    engine.add_model("smollm2", folder)
    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)", "device": "cpu",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "new_tokens": NEW_TOKENS, "runs": args.runs,
    }
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch = prompts(bs)
        result[f"prompt_tokens_bs{bs}"] = [len(tok(p)["input_ids"]) for p in batch]
        ours = bench_engine(engine, batch, args.runs)
        ref = bench_transformers(model, tok, batch, args.runs)
        result[f"gpupool_tok_s_bs{bs}"] = round(ours, 1)
        result[f"transformers_tok_s_bs{bs}"] = round(ref, 1)
        result[f"ratio_vs_transformers_bs{bs}"] = round(ours / ref, 3)
    engine.shutdown()
    emit(result, args.json)


if __name__ == "__main__":
    main()
