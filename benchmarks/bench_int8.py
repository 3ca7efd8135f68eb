"""int8 weights on the native product against torch's int8 path, in one engine.

SmolLM2-135M-Instruct with ``quantization="int8"`` (bf16 activations), one engine: each run
generates on the native int8 product (``native.gemv_int8``, which a CPU with AVX2 or AVX-512
builds), then with it switched off in the same process (``native.has_gemv_int8`` made False:
the path a build without the product takes, torch's ``_weight_int8pack_mm`` up to 24 rows, a
dequantizing reference past that), the two alternating run by run, one warm-up each. Figures:
decode tokens/s at each batch size (``--batch-sizes``, 64 new tokens, greedy, ignore_eos) and
prefill tokens/s of one prompt (``--prefill`` lengths: the time to first token); medians of
``--runs``, and each native/torch ratio. The CPU's flags and the native build's target are
printed with the result; ``GPUPOOL_NATIVE_MARCH=x86-64-v3`` times the AVX2 build on a CPU with
AVX-512 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` keep torch's side to AVX2 too).
Usage: python3 benchmarks/bench_int8.py [--json] [--runs 5] [--batch-sizes 1,8,16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit, engine_threads  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402
from gpupool.kernels import native  # noqa: E402

NEW_TOKENS = 64


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fn, runs: int) -> dict[str, float]:
    """Median seconds of ``fn`` on the native int8 product and without it, alternating."""
    real = native.has_gemv_int8
    times: dict[str, list[float]] = {"native": [], "torch": []}
    try:
        for i in range(runs + 1):
            for side in times:
                native.has_gemv_int8 = real if side == "native" else (lambda: False)
                t = _timed(fn)
                if i:
                    times[side].append(t)
    finally:
        native.has_gemv_int8 = real
    return {side: sorted(ts)[len(ts) // 2] for side, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--prefill", default="128,1000", help="prompt lengths")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = ensure_default_model(default_home())
    threads = engine_threads()
    engine = Engine(device="cpu", dtype="bfloat16", quantization="int8", threads=threads,
                    enable_prefix_caching=False)
    engine.add_model("smollm2", folder)
    if not native.has_gemv_int8():
        sys.exit("bench_int8: this build has no native int8 product (nothing to compare)")
    result = {"model": "SmolLM2-135M-Instruct int8", "cpu": cpu_flags(),
              "native_target": native.target(), "threads": threads, "runs": args.runs}
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = [f"Write a short story about robot number {i}." for i in range(bs)]
            t = alternate(lambda p=prompts: engine.generate(p, greedy), args.runs)
            for side, s in t.items():
                result[f"decode_bs{bs}_{side}_tok_s"] = round(bs * NEW_TOKENS / s, 1)
            result[f"decode_bs{bs}_native_over_torch"] = round(t["torch"] / t["native"], 2)
        one = SamplingParams(max_tokens=1, temperature=0)
        for n in [int(x) for x in args.prefill.split(",") if x]:
            ids = [100 + (7 * i) % 40000 for i in range(n)]
            t = alternate(lambda ids=ids: engine.generate([ids], one), args.runs)
            for side, s in t.items():
                result[f"prefill{n}_{side}_tok_s"] = round(n / s, 1)
            result[f"prefill{n}_native_over_torch"] = round(t["torch"] / t["native"], 2)
    finally:
        engine.shutdown()
    emit(result, args.json)


if __name__ == "__main__":
    main()
