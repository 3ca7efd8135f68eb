"""Serving benchmark: N concurrent streaming clients against ``gpupool serve`` for a fixed
time, over two base models and two LoRA adapters, in the shape of vLLM's
``benchmark_serving.py`` (request throughput, output tokens/s, TTFT / TPOT / ITL
percentiles). The baseline, in the same run: the same closed-loop load straight on an
in-process ``Engine`` (``Engine.stream``), so the difference is what HTTP, JSON, SSE and the
OpenAI layer cost.

Load: ``--clients`` clients, each sending its next request when the last one ends
(closed loop), models in rotation smollm2, a1, a2, smollm2-b (a1/a2: rank-8 q/v adapters
of smollm2; smollm2-b: a second registration of the same weights, so the pool switches
models); prompts from a fixed list of short instructions; ``--max-tokens`` new tokens each
(ignore_eos, temperature 0). Only requests that finish inside the window count.
Figures: medians over ``--runs`` alternating runs (server, engine, server, ...).
Usage: python3 benchmarks/bench_serving.py [--json] [--clients 8] [--duration 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import emit  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402
from tests.serving import Server  # noqa: E402

MODELS = ["smollm2", "a1", "a2", "smollm2-b"]
PROMPTS = ["Write a haiku about the sea.", "Explain what a GPU is.", "List three fruits.",
           "What is the capital of Italy?", "Describe a cat in one sentence.",
           "Give me a tip for learning Python.", "Why is the sky blue?", "Count to five."]
POOL = {"kv": 256 << 20, "weights": 2 << 30}


def make_adapters(base: Path, out: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, name in enumerate(("a1", "a2")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
        model.save_pretrained(str(out / name))
        paths[name] = out / name
    return paths


def summarise(records: list[dict], duration: float, window_tokens: int) -> dict:
    """vLLM-style figures from per-request records (ttft, token times); output throughput
    counts every token streamed inside the window, finished request or not."""
    if not records:
        return {"completed": 0}
    ttft = [r["ttft"] * 1e3 for r in records]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in records
            if r["tokens"] > 1]
    itl = [x * 1e3 for r in records for x in r["itl"]]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None

    res = {"completed": len(records), "duration_s": duration,
           "request_throughput": len(records) / duration,
           "output_throughput": window_tokens / duration}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        res[f"mean_{name}_ms"] = statistics.fmean(xs) if xs else None
        res[f"median_{name}_ms"] = statistics.median(xs) if xs else None
        res[f"p99_{name}_ms"] = pct(xs, 99)
    return res


async def http_load(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    records: list[dict] = []
    window = [0]
    stop_at = time.perf_counter() + duration

    async def client(cid: int, http: httpx.AsyncClient):
        k = cid
        while time.perf_counter() < stop_at:
            body = {"model": MODELS[k % len(MODELS)], "prompt": PROMPTS[k % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            k += clients
            t0 = time.perf_counter()
            times = []
            async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        if json.loads(line[6:])["choices"][0]["text"]:
                            times.append(time.perf_counter())
            end = time.perf_counter()
            window[0] += sum(1 for t in times if t <= stop_at)
            if end <= stop_at and times:
                records.append(_record(t0, times, end))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) \
            as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return summarise(records, duration, window[0])


def _record(t0, times, end):
    return {"ttft": times[0] - t0, "first": times[0], "end": times[-1], "tokens": len(times),
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def engine_load(engine: Engine, clients: int, duration: float, max_tokens: int) -> dict:
    records: list[dict] = []
    window = [0]
    stop_at = time.perf_counter() + duration
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def client(cid: int):
        k = cid
        while time.perf_counter() < stop_at:
            model, prompt = MODELS[k % len(MODELS)], PROMPTS[k % len(PROMPTS)]
            k += clients
            t0 = time.perf_counter()
            times = []
            async for out in engine.stream(prompt, params, model=model):
                if out.delta_text:
                    times.append(time.perf_counter())
            end = time.perf_counter()
            window[0] += sum(1 for t in times if t <= stop_at)
            if end <= stop_at and times:
                records.append(_record(t0, times, end))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return summarise(records, duration, window[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    smollm2 = ensure_default_model(default_home())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = make_adapters(smollm2, tmp)
        serve_args = ("--device", "cpu", "--model", f"smollm2={smollm2}",
                      "--model", f"smollm2-b={smollm2}",
                      *(x for n, p in adapters.items()
                        for x in ("--adapter", f"{n}=smollm2:{p}")), "--log-level", "warning")
        server = Server(tmp / "home", *serve_args, **POOL)
        engine = Engine(device="cpu", kv_cache_bytes=POOL["kv"], weight_bytes=POOL["weights"],
                        kv_page_bytes=256 << 10)
        engine.add_model("smollm2", smollm2)
        engine.add_model("smollm2-b", smollm2)
        for n, p in adapters.items():
            engine.add_adapter(n, "smollm2", p)
        http_runs, engine_runs = [], []
        try:
            for _ in range(args.runs):
                with server:  # the server alone on the CPU while it is measured
                    asyncio.run(http_load(server.url, args.clients, 2, args.max_tokens))
                    http_runs.append(asyncio.run(http_load(server.url, args.clients,
                                                           args.duration, args.max_tokens)))
                asyncio.run(engine_load(engine, args.clients, 2, args.max_tokens))
                engine_runs.append(asyncio.run(engine_load(engine, args.clients,
                                                           args.duration, args.max_tokens)))
        finally:
            engine.shutdown()
            server.stop()

    def med(runs, key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    keys = [k for k in http_runs[0] if k != "duration_s"]
    result = {"clients": args.clients, "duration_s": args.duration,
              "max_tokens": args.max_tokens, "models": MODELS, "runs": args.runs}
    result.update({f"http_{k}": med(http_runs, k) for k in keys})
    result.update({f"engine_{k}": med(engine_runs, k) for k in keys})
    et, ht = result["engine_output_throughput"], result["http_output_throughput"]
    result["http_vs_engine_output_throughput"] = ht / et if et else None
    result["http_overhead_pct"] = (1 - ht / et) * 100 if et else None
    result["http_minus_engine_median_ttft_ms"] = (
        result["http_median_ttft_ms"] - result["engine_median_ttft_ms"])
    result["http_minus_engine_median_tpot_ms"] = (
        result["http_median_tpot_ms"] - result["engine_median_tpot_ms"])
    emit(result, args.json)


if __name__ == "__main__":
    main()
