"""The torch backend's cost of batch invariance: its fixed-order ops against torch's fastest.

SmolLM2-135M-Instruct on the torch backend (``native=False``: what a machine without the
native kernels runs), per dtype: decode at batch 1 and 16 (bench_engine's 64 new tokens) and a
1000-token prefill, with ``batch_invariant`` on (kernels/fixed.py, the default) and off
(torch's fastest ops), interleaved for --rounds rounds; medians, ranges and ratios.
Usage: python3 benchmarks/bench_invariance.py [--json] [--rounds 3] [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_engine as be  # noqa: E402
from common import cpu_flags, emit, engine_threads  # noqa: E402

from gpupool import Engine  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    threads = engine_threads()
    folder = ensure_default_model(default_home())
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for dtype in args.dtypes.split(","):
            for invariant in (False, True):
                e = Engine(device="cpu", dtype=dtype, threads=threads, native=False,
                           batch_invariant=invariant, enable_prefix_caching=False)
                e.add_model("smollm2", str(folder))
                side = "fixed" if invariant else "fastest"
                for bs in (1, 16):
                    runs.setdefault(f"{dtype}_{side}_decode_bs{bs}", []).append(
                        bs * be.NEW_TOKENS / be.bench_engine(e, be.prompts(bs), 2))
                runs.setdefault(f"{dtype}_{side}_prefill_1000", []).append(
                    be.bench_prefill(e, 1000, 2))
                e.shutdown()
    result = {"model": "SmolLM2-135M-Instruct", "backend": "torch", "cpu": cpu_flags(),
              "threads": threads, "rounds": args.rounds}
    for key, values in runs.items():
        result[key] = f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
        if "_fixed_" in key:
            fast = runs[key.replace("_fixed_", "_fastest_")]
            result[key.replace("_fixed_", "_ratio_")] = round(
                statistics.median(values) / statistics.median(fast), 2)
    emit(result, args.json)


if __name__ == "__main__":
    main()
