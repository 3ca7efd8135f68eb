"""Serving benchmark against ``gpupool serve`` on SmolLM2, three workloads:

- ``closed`` (default): N concurrent streaming clients for a fixed time, over two base models
  and two LoRA adapters, in the shape of vLLM's ``benchmark_serving.py`` (request
  throughput, output tokens/s, TTFT / TPOT / ITL percentiles). Baseline in the same run: the
  same closed-loop load straight on an in-process ``Engine`` (``Engine.stream``), so the
  difference is what HTTP, JSON, SSE and the OpenAI layer cost. Models in rotation smollm2,
  a1, a2, smollm2-b (a1/a2: rank-8 q/v adapters; smollm2-b: a second registration of the
  same weights, so the pool switches models).
- ``burst``: ``--burst`` requests sent at once (vLLM ``bench serve`` style) over the base and
  four adapters; per adapter p50 / p99 / max inter-token latency and TTFT, the p99 ITL over
  the median ITL (a running stream gets one token per step, so the median ITL is the median
  step time of the batch) and the longest stall. Baseline in the same run: the same server
  with the prefill chunk of decoding steps uncapped (``max_prefill_tokens_while_decoding``
  = the step budget: every stream waits while a whole burst of prompts is prefilled).
- ``flood``: tenants ``flood`` (20 closed-loop clients), ``q1`` and ``q2`` (2 clients each)
  for ``--duration`` s, on a server with ``--max-num-seqs`` (16) batch slots, so the flood
  alone could fill the batch; each tenant's median and p90 TTFT. Baselines in the same run: the
  quiet tenants alone (their TTFT without the flood; goal: under the flood within 2x), and
  every request under one tenant key (no tenant fairness, FIFO).

- ``ttft``: time to first token of one long prompt (``--prompt-tokens``, 1000) through
  ``gpupool serve --dtype`` (``--dtype``, bfloat16), one request at a time after a warm-up,
  each prompt distinct from its first token on (no prefix-cache hit). Baselines in the same
  run: the same prompts on an in-process ``Engine`` (what HTTP adds) and transformers'
  forward pass over them in that dtype (a separate process).

Prompts from a fixed list of short chat instructions; ignore_eos, temperature 0. Figures are
medians over ``--runs`` runs. The CPU's flags are printed with the result.
Usage: python3 benchmarks/bench_serving.py [--workload closed|burst|flood|ttft] [--json] ...
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
from common import cpu_flags, emit, load_tests_package  # noqa: E402

load_tests_package()

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402
from tests.serving import Server  # noqa: E402

MODELS = ["smollm2", "a1", "a2", "smollm2-b"]
PROMPTS = ["Write a haiku about the sea.", "Explain what a GPU is.", "List three fruits.",
           "What is the capital of Italy?", "Describe a cat in one sentence.",
           "Give me a tip for learning Python.", "Why is the sky blue?", "Count to five."]
POOL = {"kv": 256 << 20, "weights": 2 << 30}


def make_adapters(base: Path, out: Path, names=("a1", "a2")) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, name in enumerate(names):
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


# ---- burst and flood -------------------------------------------------------------------------
BURST_MODELS = ["smollm2", "b1", "b2", "b3", "b4"]


async def _stream_one(http, url, body, headers=None) -> dict:
    """One streamed completion: its TTFT and the gaps between its tokens (seconds)."""
    t0 = time.perf_counter()
    times = []
    async with http.stream("POST", url + "/v1/completions", json=body,
                           headers=headers or {}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0 if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])]}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None


def _latency_figures(records: list[dict]) -> dict:
    ttft = [r["ttft"] * 1e3 for r in records if r["ttft"] is not None]
    itl = [x * 1e3 for r in records for x in r["itl"]]
    return {"n": len(records), "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "itl_p50_ms": _pct(itl, 50), "itl_p99_ms": _pct(itl, 99),
            "itl_max_ms": max(itl) if itl else None}


async def burst_load(url: str, n: int, max_tokens: int) -> dict:
    """``n`` streamed requests at once over BURST_MODELS; figures overall and per model."""
    bodies = [{"model": BURST_MODELS[i % len(BURST_MODELS)], "prompt": PROMPTS[i % len(PROMPTS)],
               "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
              for i in range(n)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n)) as http:
        records = await asyncio.gather(*(_stream_one(http, url, b) for b in bodies))
    out = _latency_figures(records)
    out["p99_itl_over_median"] = (out["itl_p99_ms"] / out["itl_p50_ms"]
                                  if out["itl_p50_ms"] else None)
    out["per_model"] = {m: _latency_figures([r for r, b in zip(records, bodies)
                                             if b["model"] == m]) for m in BURST_MODELS}
    return out


async def flood_load(url: str, keys: dict[str, str], clients: dict[str, int], duration: float,
                     max_tokens: int) -> dict:
    """Closed-loop clients per tenant (``clients``), each tenant with its own key (``keys``:
    tenant -> key); each tenant's median and p90 TTFT over the requests that finished."""
    stop_at = time.perf_counter() + duration
    ttfts: dict[str, list[float]] = {t: [] for t in clients}

    async def client(tenant: str, k: int, http):
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        while time.perf_counter() < stop_at:
            body = {"model": "smollm2", "prompt": PROMPTS[k % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            k += 1
            r = await _stream_one(http, url, body, headers)
            if time.perf_counter() <= stop_at and r["ttft"] is not None:
                ttfts[tenant].append(r["ttft"] * 1e3)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        await asyncio.gather(*(client(t, i, http) for t, c in clients.items()
                               for i in range(c)))
    return {t: {"n": len(xs), "ttft_p50_ms": _pct(xs, 50), "ttft_p90_ms": _pct(xs, 90)}
            for t, xs in ttfts.items()}


def _median_of(runs: list[dict], path: tuple) -> float | None:
    vals = []
    for r in runs:
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None
        if r is not None:
            vals.append(r)
    return statistics.median(vals) if vals else None


def run_burst(args, smollm2: Path, tmp: Path) -> dict:
    adapters = make_adapters(smollm2, tmp, names=("b1", "b2", "b3", "b4"))
    serve_args = ("--device", "cpu", "--model", f"smollm2={smollm2}", "--log-level", "warning",
                  *(x for n, p in adapters.items() for x in ("--adapter", f"{n}=smollm2:{p}")))
    settings = {"capped": "", "uncapped": "max_prefill_tokens_while_decoding = 1024\n"}
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    for _ in range(args.runs):
        for label, toml in settings.items():
            with Server(tmp / f"home-{label}", *serve_args, engine_toml=toml, **POOL) as server:
                asyncio.run(burst_load(server.url, 8, 4))  # warm-up: learns the step cost
                runs[label].append(asyncio.run(burst_load(server.url, args.burst,
                                                          args.max_tokens)))
    result = {"workload": "burst", "requests": args.burst, "max_tokens": args.max_tokens,
              "models": BURST_MODELS, "runs": args.runs}
    keys = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms",
            "p99_itl_over_median")
    for label in settings:
        for k in keys:
            result[f"{label}_{k}"] = _median_of(runs[label], (k,))
        for m in BURST_MODELS:
            result[f"{label}_{m}"] = {k: _median_of(runs[label], ("per_model", m, k))
                                      for k in keys[:5]}
    result["uncapped_over_capped_itl_p99"] = (result["uncapped_itl_p99_ms"]
                                              / result["capped_itl_p99_ms"])
    result["uncapped_over_capped_itl_max"] = (result["uncapped_itl_max_ms"]
                                              / result["capped_itl_max_ms"])
    return result


def _long_prompts(n: int, tokens: int) -> list[list[int]]:
    """``n`` token-id prompts of ``tokens`` ids, each distinct from its first id on."""
    return [[1000 + i] + [100 + (7 * j + 13 * i) % 40000 for j in range(tokens - 1)]
            for i in range(n)]


async def _ttft_http(url: str, prompts: list, max_tokens: int = 2) -> list[float]:
    async with httpx.AsyncClient(timeout=300) as http:
        out = []
        for p in prompts:
            body = {"model": "smollm2", "prompt": p, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            out.append((await _stream_one(http, url, body))["ttft"])
        return out


def run_ttft(args, smollm2: Path, tmp: Path) -> dict:
    from bench_engine import transformers_figures
    from common import in_subprocess

    n, warm = args.runs * 3, 3
    prompts = _long_prompts(n + warm, args.prompt_tokens)
    serve_args = ("--device", "cpu", "--dtype", args.dtype, "--model", f"smollm2={smollm2}",
                  "--log-level", "warning")
    with Server(tmp / "home", *serve_args, **POOL) as server:
        # warm-up: enough steps for the weights to be packed (models.loaded.PACK_AFTER_STEPS)
        asyncio.run(_ttft_http(server.url, PROMPTS[:1], max_tokens=32))
        asyncio.run(_ttft_http(server.url, prompts[:warm]))
        http = asyncio.run(_ttft_http(server.url, prompts[warm:]))
    engine = Engine(device="cpu", dtype=args.dtype, kv_cache_bytes=POOL["kv"],
                    weight_bytes=POOL["weights"])
    engine.add_model("smollm2", smollm2)
    one = SamplingParams(max_tokens=1, temperature=0)
    try:
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=32, temperature=0))
        engine.generate(prompts[:warm], one)
        local = []
        for p in prompts[warm:]:
            t0 = time.perf_counter()
            engine.generate([p], one)
            local.append(time.perf_counter() - t0)
    finally:
        engine.shutdown()
    ref = in_subprocess(transformers_figures, str(smollm2), args.dtype, [],
                        [args.prompt_tokens], args.runs)
    theirs = args.prompt_tokens / ref[f"prefill{args.prompt_tokens}"]
    result = {"workload": "ttft", "prompt_tokens": args.prompt_tokens, "dtype": args.dtype,
              "requests": n, "http_ttft_median_ms": statistics.median(http) * 1e3,
              "http_ttft_max_ms": max(http) * 1e3,
              "engine_ttft_median_ms": statistics.median(local) * 1e3,
              "transformers_forward_ms": theirs * 1e3}
    result["http_vs_transformers"] = theirs / statistics.median(http)
    return result


def run_flood(args, smollm2: Path, tmp: Path) -> dict:
    serve_args = ("--device", "cpu", "--model", f"smollm2={smollm2}", "--log-level", "warning",
                  "--admin-key", "bench-admin-key")
    clients = {"flood": 20, "q1": 2, "q2": 2}
    runs: dict[str, list[dict]] = {"alone": [], "fair": [], "one_tenant": []}
    toml = f"max_num_seqs = {args.max_num_seqs}\n"  # fewer slots than clients: they are shared
    for i in range(args.runs):
        with Server(tmp / f"home-flood-{i}", *serve_args, engine_toml=toml, **POOL) as server:
            admin = {"Authorization": "Bearer bench-admin-key"}
            keys = {t: httpx.post(server.url + "/admin/tenants", headers=admin, timeout=30,
                                  json={"name": t, "models": ["*"]}).json()["api_key"]
                    for t in clients}
            asyncio.run(flood_load(server.url, keys, {"q1": 1}, 3, 4))  # warm-up
            quiet = {t: c for t, c in clients.items() if t != "flood"}
            runs["alone"].append(asyncio.run(flood_load(server.url, keys, quiet,
                                                        args.duration, args.max_tokens)))
            runs["fair"].append(asyncio.run(flood_load(server.url, keys, clients,
                                                       args.duration, args.max_tokens)))
            same = dict.fromkeys(clients, keys["flood"])  # everyone under one key: FIFO
            runs["one_tenant"].append(asyncio.run(flood_load(server.url, same, clients,
                                                             args.duration, args.max_tokens)))
    result = {"workload": "flood", "clients": clients, "duration_s": args.duration,
              "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
              "runs": args.runs}
    for label, rs in runs.items():
        for t in clients:
            if label == "alone" and t == "flood":
                continue
            for k in ("ttft_p50_ms", "ttft_p90_ms", "n"):
                result[f"{label}_{t}_{k}"] = _median_of(rs, (t, k))
    for t in ("q1", "q2"):
        alone = result[f"alone_{t}_ttft_p50_ms"]
        result[f"{t}_ttft_flood_over_alone"] = result[f"fair_{t}_ttft_p50_ms"] / alone
        result[f"{t}_ttft_one_tenant_over_alone"] = (result[f"one_tenant_{t}_ttft_p50_ms"]
                                                    / alone)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["closed", "burst", "flood", "ttft"],
                    default="closed")
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="the ttft workload's")
    ap.add_argument("--dtype", default="bfloat16", help="the ttft workload's")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--burst", type=int, default=64, help="requests at once (burst)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="batch slots of the flood's server (fewer than its 24 clients)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    smollm2 = ensure_default_model(default_home())
    if args.workload != "closed":
        with tempfile.TemporaryDirectory() as tmp:
            run = {"burst": run_burst, "flood": run_flood, "ttft": run_ttft}[args.workload]
            result = run(args, smollm2, Path(tmp))
        result["cpu"] = cpu_flags()
        emit(result, args.json)
        return
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
