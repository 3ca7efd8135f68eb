"""Decode and prefill speed of gpupool's engine vs transformers on SmolLM2-135M-Instruct, per
dtype, against the memory-bandwidth bound.

Per variant (``--variants``: a dtype, optionally ``+int8`` for int8 weights; default float32,
bfloat16 and bfloat16+int8), in the same run:
- decode: output tokens/s at each batch size (``--batch-sizes``, 64 new tokens, greedy, both
  sides generate exactly 64: the engine with ignore_eos, transformers with min_new_tokens) and
  the engine's decode step time (the 64-token run less the 1-token run, over 63 steps) as a
  multiple of the bound: the model's weight bytes in that dtype over the measured read
  bandwidth (a decode step must read every weight once);
- prefill: tokens/s of one prompt of 128 and of 1000 tokens (the engine's time to first
  token; transformers' forward pass), same dtype (int8: transformers in bf16), and the
  engine's time against the compute bound: 2 x parameters x tokens FLOPs over the matmul
  FLOP/s measured in that dtype (a 1024 x 576 x 1536 product).
transformers runs a batch with left padding, as its docs recommend, in a separate process
(the engine's process keeps one torch thread team, as ``gpupool serve`` does). Each figure is the
median of ``--runs`` timed runs after one warm-up. The CPU's flags and the bandwidth are
printed with the result: read before each variant and at the end (it varies on a shared
machine), the bound taken from the highest reading; and read again just before and just after
each decode measurement, which gives each step a second ratio, against the higher of the two
readings around it (``..._vs_local_bound_...``: what the machine gave while the step ran).
- sampled decode (``--sampled``, batch sizes; default 1 and 16): the same batch greedy and
  sampled (temperature 1, top_p 0.9, each request its own seed), interleaved, tokens/s and
  their ratio.
Usage: python3 benchmarks/bench_engine.py [--json] [--runs 3] [--sampled 1,16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    cpu_flags,
    emit,
    engine_threads,
    in_subprocess,
    median_seconds,
    sweep,
    variants,
)

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


def read_bandwidth(runs: int = 5) -> float:
    """Bytes/s the CPU reads from memory: the median time to sum a 512 MiB buffer."""
    x = torch.ones(128 << 20, dtype=torch.float32)
    return x.numel() * 4 / median_seconds(lambda: x.sum(), runs)


def matmul_flops(dtype: torch.dtype, runs: int = 5) -> float:
    """FLOP/s of a prefill-sized matmul (1024 tokens x SmolLM2's 576 -> 1536) in ``dtype``."""
    a = torch.randn(1024, 576).to(dtype)
    b = torch.randn(576, 1536).to(dtype)
    return 2 * 1024 * 576 * 1536 / median_seconds(lambda: a @ b, runs)


def bench_engine(engine: Engine, batch: list[str], runs: int,
                 new_tokens: int = NEW_TOKENS) -> float:
    """Seconds to generate ``new_tokens`` for every prompt of ``batch`` (median)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run():
        outs = engine.generate(batch, params)
        assert all(len(o.token_ids) == new_tokens for o in outs)

    return median_seconds(run, runs)


def bench_sampled(engine: Engine, batch: list[str], runs: int) -> tuple[float, float]:
    """Seconds (median) for NEW_TOKENS of every prompt greedy, then sampled (temperature 1,
    top_p 0.9), the two interleaved run by run (one warm-up each)."""
    kinds = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9,
                            ignore_eos=True)]
    times: list[list[float]] = [[], []]
    for i in range(runs + 1):
        for kind, params in enumerate(kinds):
            t = time.perf_counter()
            outs = engine.generate(batch, params)
            assert all(len(o.token_ids) == NEW_TOKENS for o in outs)
            if i:
                times[kind].append(time.perf_counter() - t)
    return tuple(sorted(ts)[len(ts) // 2] for ts in times)


def bench_transformers(model, tok, batch: list[str], runs: int) -> float:
    enc = tok(batch, return_tensors="pt", padding=True)

    def run():
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS

    return len(batch) * NEW_TOKENS / median_seconds(run, runs)


def prefill_ids(n: int) -> list[int]:
    return [100 + (7 * i) % 40000 for i in range(n)]


def bench_prefill(engine: Engine, n: int, runs: int) -> float:
    """The engine's prefill tokens/s of one ``n``-token prompt (its time to first token)."""
    one = SamplingParams(max_tokens=1, temperature=0)
    return n / median_seconds(lambda: engine.generate([prefill_ids(n)], one), runs)


def transformers_figures(folder: str, dtype: str, batch_sizes: list[int],
                         prefill: list[int], runs: int) -> dict:
    """transformers' decode tokens/s per batch size and prefill tokens/s per prompt length
    (run by ``in_subprocess``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    out = {f"bs{bs}": bench_transformers(model, tok, prompts(bs), runs) for bs in batch_sizes}
    for n in prefill:
        x = torch.tensor([prefill_ids(n)])

        def forward(x=x):
            with torch.inference_mode():
                model(x)

        out[f"prefill{n}"] = n / median_seconds(forward, runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+int8")
    ap.add_argument("--prefill", default="128,1000", help="prompt lengths for prefill")
    ap.add_argument("--sampled", default="1,16",
                    help="batch sizes for sampled vs greedy decode ('' for none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = ensure_default_model(default_home())
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    lengths = [int(x) for x in args.prefill.split(",")]
    sampled = [int(b) for b in args.sampled.split(",") if b]
    threads = engine_threads()  # before any torch work in this process
    # the read bandwidth varies on a shared machine (26.6 and 49.9 GB/s in two runs an hour
    # apart): read before every variant and at the end; the bound uses the highest reading
    # (the strictest bound), each step's ratio is computed once all readings are in
    readings = [in_subprocess(read_bandwidth)]
    result = {
        "model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
        "threads": threads, "new_tokens": NEW_TOKENS, "runs": args.runs,
    }
    steps: dict[str, float] = {}  # "{label}_bs{bs}" -> step ms
    weights: dict[str, int] = {}
    todo = variants(args.variants)
    with sweep(len(todo) * (1 + len(batch_sizes) + len(lengths) + len(sampled)),
               "bench_engine") as bar:
        for label, dtype, quant in todo:
            bar.note(f"{label} transformers")
            ref = in_subprocess(transformers_figures, str(folder), dtype, batch_sizes, lengths,
                                args.runs)
            bar.update()
            readings.append(in_subprocess(read_bandwidth))
            # no prefix cache: the same prompts run again and again here
            engine = Engine(device="cpu", dtype=dtype, quantization=quant, threads=threads,
                            enable_prefix_caching=False)
            engine.add_model("smollm2", folder)
            worker = engine.local.core.workers["smollm2"]
            weight_bytes = worker.layout.num_bytes
            params = sum(s.numel for s in worker.layout.specs if not s.name.endswith("_scale"))
            weights[label] = weight_bytes
            flops = in_subprocess(matmul_flops, getattr(torch, dtype))
            result[f"{label}_weight_bytes_per_decode_step"] = weight_bytes
            result[f"{label}_matmul_gflop_s"] = round(flops / 1e9, 1)
            for bs in batch_sizes:
                bar.note(f"{label} batch {bs}")
                batch = prompts(bs)
                around = [in_subprocess(read_bandwidth)]
                full = bench_engine(engine, batch, args.runs)
                first = bench_engine(engine, batch, args.runs, new_tokens=1)
                around.append(in_subprocess(read_bandwidth))
                step_ms = (full - first) / (NEW_TOKENS - 1) * 1e3
                local_ms = weight_bytes / max(around) * 1e3
                result[f"{label}_bandwidth_gb_s_around_bs{bs}"] = [
                    round(b / 1e9, 1) for b in around]
                result[f"{label}_decode_step_vs_local_bound_bs{bs}"] = round(
                    step_ms / local_ms, 2)
                ours = bs * NEW_TOKENS / full
                theirs = ref[f"bs{bs}"]
                result[f"{label}_gpupool_tok_s_bs{bs}"] = round(ours, 1)
                result[f"{label}_transformers_tok_s_bs{bs}"] = round(theirs, 1)
                result[f"{label}_ratio_vs_transformers_bs{bs}"] = round(ours / theirs, 3)
                result[f"{label}_decode_step_ms_bs{bs}"] = round(step_ms, 2)
                steps[f"{label}_bs{bs}"] = step_ms
                bar.update()
            for bs in sampled:
                bar.note(f"{label} sampled batch {bs}")
                greedy_s, sampled_s = bench_sampled(engine, prompts(bs), args.runs)
                result[f"{label}_greedy_tok_s_bs{bs}"] = round(bs * NEW_TOKENS / greedy_s, 1)
                result[f"{label}_sampled_tok_s_bs{bs}"] = round(bs * NEW_TOKENS / sampled_s, 1)
                result[f"{label}_sampled_vs_greedy_bs{bs}"] = round(greedy_s / sampled_s, 3)
                bar.update()
            for n in lengths:
                bar.note(f"{label} prefill {n}")
                ours, theirs = bench_prefill(engine, n, args.runs), ref[f"prefill{n}"]
                result[f"{label}_prefill_tok_s_{n}"] = round(ours)
                result[f"{label}_transformers_prefill_tok_s_{n}"] = round(theirs)
                result[f"{label}_prefill_ratio_vs_transformers_{n}"] = round(ours / theirs, 2)
                compute_s = 2 * params * n / flops
                result[f"{label}_prefill_vs_compute_bound_{n}"] = round(n / ours / compute_s, 2)
                bar.update()
            engine.shutdown()
    readings.append(in_subprocess(read_bandwidth))
    bandwidth = max(readings)
    result["read_bandwidth_gb_s_readings"] = [round(b / 1e9, 1) for b in readings]
    result["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    for label, weight_bytes in weights.items():
        bound_ms = weight_bytes / bandwidth * 1e3
        result[f"{label}_decode_bound_ms"] = round(bound_ms, 2)
        for bs in batch_sizes:
            result[f"{label}_decode_step_vs_bound_bs{bs}"] = round(
                steps[f"{label}_bs{bs}"] / bound_ms, 2)
    emit(result, args.json)


if __name__ == "__main__":
    main()
