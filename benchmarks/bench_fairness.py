"""Head-of-line blocking across tenants: tenant B's short prompt arriving while tenant A's long
prompt prefills (SmolLM2, this machine's default dtype).

Each round runs, in one engine per setting: A alone (its time to first token: the prefill),
then A with B arriving ``--delay`` s later (B's and A's time to first token), with the fair
prefill share (the default) and without it (``fair_prefill=False``: running prompts take the
whole step budget, as before). Prints medians over ``--rounds`` and the ratios.

    python3 benchmarks/bench_fairness.py [--prompt 8000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, engine_threads  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402
from gpupool.messages.types import EngineRequest  # noqa: E402


def _ttfts(engine, requests, delays) -> dict[str, float]:
    """Each request's time to first token from its own submission."""
    first: dict[str, float] = {}
    sent: dict[str, float] = {}
    done = threading.Semaphore(0)

    def sink_for(rid):
        def sink(delta):
            if delta.token_ids and rid not in first:
                first[rid] = time.perf_counter() - sent[rid]
            if delta.finished:
                done.release()
        return sink

    start = time.perf_counter()
    for req, delay in zip(requests, delays):
        time.sleep(max(0.0, start + delay - time.perf_counter()))
        sent[req.request_id] = time.perf_counter()
        engine.local.submit([req], [sink_for(req.request_id)])
    for _ in requests:
        assert done.acquire(timeout=600)
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8000, help="A's prompt tokens")
    ap.add_argument("--short", type=int, default=20, help="B's prompt tokens")
    ap.add_argument("--delay", type=float, default=1.0, help="B arrives this long after A")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    print(cpu_flags())
    folder = ensure_default_model(default_home())
    long_ids = [100 + i % 20000 for i in range(args.prompt)]
    short_ids = [200 + i for i in range(args.short)]
    results: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        for fair in (True, False):
            e = Engine(device="cpu", threads=engine_threads(), enable_prefix_caching=False,
                       fair_prefill=fair)
            e.add_model("smollm2", str(folder))
            try:
                a = EngineRequest(f"a{rnd}", "smollm2", long_ids,
                                  SamplingParams(max_tokens=1, temperature=0), tenant="A")
                alone = _ttfts(e, [a], [0.0])[a.request_id]
                a2 = EngineRequest(f"a2{rnd}", "smollm2", long_ids,
                                   SamplingParams(max_tokens=1, temperature=0), tenant="A")
                b = EngineRequest(f"b{rnd}", "smollm2", short_ids,
                                  SamplingParams(max_tokens=16, temperature=0), tenant="B")
                both = _ttfts(e, [a2, b], [0.0, args.delay])
            finally:
                e.shutdown()
            tag = "fair" if fair else "unfair"
            results.setdefault(f"{tag}_a_alone_s", []).append(alone)
            results.setdefault(f"{tag}_a_with_b_s", []).append(both[a2.request_id])
            results.setdefault(f"{tag}_b_ttft_s", []).append(both[b.request_id])
            print(f"round {rnd} {tag}: A alone {alone:.2f} s, A with B "
                  f"{both[a2.request_id]:.2f} s, B's first token {both[b.request_id]:.2f} s",
                  flush=True)
    med = {k: round(statistics.median(v), 3) for k, v in results.items()}
    med["b_ttft_ratio_fair_over_unfair"] = round(med["fair_b_ttft_s"] / med["unfair_b_ttft_s"],
                                                 3)
    med["a_slowdown_fair"] = round(med["fair_a_with_b_s"] / med["fair_a_alone_s"], 3)
    med["a_slowdown_unfair"] = round(med["unfair_a_with_b_s"] / med["unfair_a_alone_s"], 3)
    ranges = {k: (round(min(v), 2), round(max(v), 2)) for k, v in results.items()}
    if args.json:
        print(json.dumps({"medians": med, "ranges": ranges}))
    else:
        for k, v in med.items():
            print(f"{k:32s} {v}  {ranges.get(k, '')}")


if __name__ == "__main__":
    main()
