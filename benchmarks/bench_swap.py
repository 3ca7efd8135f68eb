"""Model switch cost: a running engine that last served model A is asked for model B.

Two SmolLM2-135M models (the default model's weights under two names) share an arena whose
weight region holds one of them, so every switch evicts one and copies the other in. For each
of --variants (dtype, optionally +int8 weights: half bf16's bytes), measured in the same run,
medians of --runs switches:
  residency_s      making B resident (slab allocation, eviction, bulk copy, rebinding views),
                   from the engine's own swap record;
  raw_copy_s       one copy of the same number of bytes between two preallocated buffers (the
                   physical floor: host memcpy here, host-to-device bandwidth on a GPU);
  switch_to_first_token_s   "B needed" to B's first token (swap + prefill + first decode);
  cold_start_s     a fresh Python process that imports gpupool, starts an engine, loads B and
                   produces its first token: what scaling without component reuse pays.
Usage: python3 benchmarks/bench_swap.py [--json] [--runs 5] [--variants float32,bfloat16,...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
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
from gpupool.models.config import ModelConfig  # noqa: E402
from gpupool.models.loader import build_layout  # noqa: E402

PROMPT = "The capital of France is"
COLD = """
import time, sys
t = time.perf_counter()
from gpupool import Engine, SamplingParams
e = Engine(device="cpu")
e.add_model("b", sys.argv[1])
e.generate("{prompt}", SamplingParams(max_tokens=1, temperature=0))
e.shutdown()
"""


def raw_copy_seconds(nbytes: int, runs: int) -> float:
    """One copy of ``nbytes`` between two preallocated buffers, every torch thread (run by
    ``in_subprocess``)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    return median_seconds(lambda: dst.copy_(src), runs)


def switch_costs(folder: Path, dtype: str, quantization: str | None, runs: int,
                 threads: int) -> dict:
    one = SamplingParams(max_tokens=1, temperature=0)
    nbytes = build_layout(ModelConfig.from_folder(folder), getattr(torch, dtype),
                          quantization).num_bytes
    engine = Engine(device="cpu", dtype=dtype, quantization=quantization, threads=threads,
                    weight_bytes=nbytes)  # room for one model's weights
    engine.add_model("a", folder)
    engine.add_model("b", folder)
    switch, residency = [], []
    for _ in range(runs):
        engine.generate(PROMPT, one, model="a")  # A is resident, B is not
        swaps = engine.local.weights.num_swaps
        seconds = engine.local.weights.swap_seconds
        t = time.perf_counter()
        engine.generate(PROMPT, one, model="b")
        switch.append(time.perf_counter() - t)
        assert engine.local.weights.num_swaps == swaps + 1
        residency.append(engine.local.weights.swap_seconds - seconds)
    warm_b = median_seconds(lambda: engine.generate(PROMPT, one, model="b"), runs)
    engine.shutdown()
    raw = in_subprocess(raw_copy_seconds, nbytes, runs)
    out = {
        "weight_bytes": nbytes,
        "residency_s": round(statistics.median(residency), 4),
        "raw_copy_s": round(raw, 4),
        "switch_to_first_token_s": round(statistics.median(switch), 4),
        "resident_first_token_s": round(warm_b, 4),
    }
    out["ratio_vs_raw_copy"] = round(out["residency_s"] / raw, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+int8")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = engine_threads()  # as gpupool serve: one torch thread team in this process
    folder = ensure_default_model(default_home())
    result = {"model": "SmolLM2-135M-Instruct x2", "device": "cpu", "cpu": cpu_flags(),
              "runs": args.runs}
    todo, cold_runs = variants(args.variants), max(3, args.runs // 2)
    with sweep(len(todo) + cold_runs, "bench_swap") as bar:
        for label, dtype, quant in todo:
            bar.note(f"{label} switches")
            for key, value in switch_costs(folder, dtype, quant, args.runs, threads).items():
                result[f"{label}_{key}"] = value
            bar.update()
        cold = []
        bar.note("cold starts")
        for _ in range(cold_runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-P", "-c", COLD.format(prompt=PROMPT), str(folder)],
                           check=True, capture_output=True)
            cold.append(time.perf_counter() - t)
            bar.update()
    result["cold_start_s (dtype auto)"] = round(statistics.median(cold), 3)
    for label, _, _ in variants(args.variants):
        result[f"{label}_speedup_vs_cold_start"] = round(
            statistics.median(cold) / result[f"{label}_switch_to_first_token_s"], 1)
    emit(result, args.json)

if __name__ == "__main__":
    main()
