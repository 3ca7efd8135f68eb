"""What the cluster costs and how fast it heals, on CPU with a tiny model.

1. Added latency: the same closed-loop load (``--clients`` streaming clients, ``--requests``
   each, ``--max-tokens`` tokens, greedy) against ``gpupool serve`` (one process, one engine)
   and against a gateway with one worker (same engine settings); medians of TTFT and of
   per-request tokens/s, and the gateway's added TTFT and throughput ratio.
2. Failover: two workers; a stream is started, and after ``--tokens-before`` tokens the worker
   holding it is SIGKILLed (a dead process) or SIGSTOPped (a lost node: its connections stay,
   its heartbeat stops); the client's longest wait for a token from the signal on (tokens the
   dead worker had already written arrive first, then the stall while the request moves),
   median over ``--trials``: with the model already loaded on the other worker, and with it
   loaded there on the move. The lost-node figure is bounded below by the heartbeat TTL
   (``--ttl-s``). The gateway moves one request at most ``--migration-limit`` times.

Baseline in the same run: ``gpupool serve``. The CPU's flags are printed with the result.

Adapters (``--zipf-adapters N``, issue 31's cluster goal): SmolLM2-135M-Instruct in bf16 and N
rank-8 q/k/v/o adapters (``bench_lora.py``'s, made once into ``<home>/bench-adapters``)
registered on a gateway; ``--zipf-clients`` closed-loop clients send ``--zipf-requests``
completions (``--max-tokens`` greedy tokens, ignore_eos), each request's adapter drawn by
Zipf(``--zipf``) over the N. One worker (one torch thread) serves the workload, then two
workers (one thread each) serve it again; each run repeated ``--runs`` times (tokens/s
median). Printed: tokens/s of each and their ratio, and for the two-worker runs the share of
requests routed to a worker that already held their adapter (``routes{reason=adapter}``: in
a device slot; ``adapter-cached``: in its host cache) and each worker's share
(``worker_routes``). The baseline in the same run is the one-worker cluster.
Usage: python3 benchmarks/bench_cluster.py [--json] [--trials 5]
       python3 benchmarks/bench_cluster.py --zipf-adapters 64 [--zipf 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit, load_tests_package  # noqa: E402

load_tests_package()

from gpupool.cluster import keys  # noqa: E402
from gpupool.messages.codec import to_wire  # noqa: E402
from gpupool.messages.params import SamplingParams  # noqa: E402
from gpupool.messages.types import EngineRequest  # noqa: E402
from tests.cluster import ADMIN, Cluster  # noqa: E402
from tests.factories import make_tiny_model  # noqa: E402
from tests.serving import POOL_TOML, Server  # noqa: E402

KV, WEIGHTS = 128 << 20, 1 << 30  # the same engine settings on both sides

PROMPT = [5, 17, 42, 9, 33, 71, 8, 12]


def _stream(url: str, model: str, max_tokens: int, on_token=None) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times = []
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions",
                                                  json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(times))
    return {"ttft": times[0] - t0, "tok_s": (len(times) - 1) / (times[-1] - times[0])
            if len(times) > 1 else 0.0, "times": times}


def closed_loop(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    records: list[dict] = []
    lock = threading.Lock()

    def client():
        for _ in range(requests):
            r = _stream(url, model, max_tokens)
            with lock:
                records.append(r)

    _stream(url, model, 4)  # warm-up: the model is loaded and resident
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"median_ttft_ms": statistics.median(r["ttft"] for r in records) * 1e3,
            "median_tok_s": statistics.median(r["tok_s"] for r in records),
            "requests": len(records)}


def warm(c: Cluster, worker: str, model: str) -> None:
    """Load ``model`` on ``worker`` (one request straight to its inbox)."""
    req = EngineRequest(f"warm-{worker}-{time.monotonic_ns()}", model, PROMPT,
                        SamplingParams(max_tokens=1, temperature=0))
    c.r.xadd(keys.inbox(worker), {"msg": json.dumps(to_wire(req))})
    deadline = time.monotonic() + 60
    while not c.r.xlen(keys.outbox(req.request_id)) and time.monotonic() < deadline:
        time.sleep(0.01)


def failover(c: Cluster, gw: Server, model: str, how: str, before: int, trials: int,
             max_tokens: int, warm_target: bool) -> list[float]:
    """``warm_target``: the other worker has the model loaded when the request moves (else
    it loads it then: the stall includes a model load)."""
    out = []
    for _ in range(trials):
        for name in c.workers:
            if warm_target:
                warm(c, name, model)
        signalled: dict = {}

        def on_token(n, signalled=signalled):
            if n >= before and "at" not in signalled:
                pool = httpx.get(gw.url + "/admin/pool", headers=ADMIN).json()["workers"]
                busy = [w for w in pool if w["alive"] and w["running"]]
                if not busy:  # its heartbeat has not told yet: try at the next token
                    return
                name = busy[0]["name"]
                proc = c.workers[name]
                signalled["name"], signalled["at"] = name, time.perf_counter()
                proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)

        r = _stream(gw.url, model, max_tokens, on_token)
        # tokens the dead worker had written still arrive just after the signal; the
        # failover is the stall that follows: the longest wait for a token from the signal on
        after = [signalled["at"]] + [t for t in r["times"] if t > signalled["at"]]
        out.append(max(b - a for a, b in zip(after, after[1:])))
        proc = c.workers[signalled["name"]]
        if how == "stop":
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        c.start_worker(signalled["name"])
        _stream(gw.url, model, 2)  # the restarted worker is seen before the next trial

    return out


ZIPF_TOML = """
[engine]
device = "cpu"
dtype = "bfloat16"
kv_cache_bytes = 268435456
kv_page_bytes = 65536
weight_bytes = 1073741824
host_cache_bytes = 1073741824
"""


def _metric(url: str, name: str) -> dict[str, float]:
    """A gateway counter family by its one label: {label value: count}."""
    text = httpx.get(url + "/metrics", headers=ADMIN).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_total{"):
            label, value = line[len(name) + 7:].split("} ")
            out[label.split('"')[1]] = float(value)
    return out


def zipf_load(url: str, names: list[str], clients: int, max_tokens: int) -> float:
    """Output tokens/s of ``clients`` closed-loop clients working through one request per
    name in ``names`` (its adapter)."""
    todo = list(reversed(names))
    lock = threading.Lock()
    tokens, errors = [0], []

    def client():
        with httpx.Client(timeout=300) as c:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    name = todo.pop()
                try:
                    r = c.post(url + "/v1/completions", json={
                        "model": name, "prompt": PROMPT * 4, "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True})
                except httpx.HTTPError as e:
                    with lock:
                        errors.append(repr(e))
                    return
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text}")
                        return
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:  # a failed request: no figure over fewer of them
        raise RuntimeError(errors[0])
    return tokens[0] / (time.perf_counter() - t)


def zipf_adapters(args) -> dict:
    from bench_lora import many_adapter_folders, zipf_names

    from gpupool.config import default_home
    from gpupool.default_model import ensure_default_model

    home = default_home()
    folder = ensure_default_model(home)
    paths = many_adapter_folders(folder, args.zipf_adapters)
    runs = [zipf_names(args.zipf_adapters, args.zipf_requests, args.zipf, seed=k)
            for k in range(args.runs + 1)]  # a warm-up, then the timed ones
    out = {"cpu": cpu_flags(), "model": "SmolLM2-135M-Instruct, bf16, CPU, 1 thread a worker",
           "adapters": args.zipf_adapters, "zipf": args.zipf, "requests": args.zipf_requests,
           "clients": args.zipf_clients, "max_tokens": args.max_tokens, "runs": args.runs,
           "distinct_per_run": [len(set(r)) for r in runs[1:]]}
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(home, Path(tmp) / "cluster", threads=1, worker_toml=ZIPF_TOML)
        try:
            c.start_worker("w1")
            gw = c.gateway("--model", f"base={folder}")
            try:
                for i, path in enumerate(paths):
                    r = httpx.post(gw.url + "/admin/adapters", headers=ADMIN, timeout=60,
                                   json={"name": f"a{i}", "base": "base", "path": str(path)})
                    r.raise_for_status()
                for workers in (1, 2):
                    if workers == 2:
                        c.start_worker("w2")
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline and sum(
                                w["alive"] for w in httpx.get(
                                    gw.url + "/admin/pool", headers=ADMIN).json()["workers"]
                        ) < 2:
                            time.sleep(0.1)
                    zipf_load(gw.url, runs[0], args.zipf_clients, args.max_tokens)
                    routes = _metric(gw.url, "gpupool_cluster_routes")
                    by_worker = _metric(gw.url, "gpupool_cluster_worker_routes")
                    rates = [zipf_load(gw.url, names, args.zipf_clients, args.max_tokens)
                             for names in runs[1:]]
                    out[f"tok_s_{workers}_worker"] = round(statistics.median(rates), 1)
                    out[f"tok_s_{workers}_worker_each"] = [round(x, 1) for x in rates]
                    after = _metric(gw.url, "gpupool_cluster_routes")
                    after_w = _metric(gw.url, "gpupool_cluster_worker_routes")
                    total = sum(after.values()) - sum(routes.values())
                    if workers == 2 and total:
                        for reason in after:
                            out[f"routed_{reason}"] = round(
                                (after[reason] - routes.get(reason, 0)) / total, 3)
                        for w in after_w:
                            out[f"share_{w}"] = round(
                                (after_w[w] - by_worker.get(w, 0)) / total, 3)
            finally:
                gw.stop()
        finally:
            c.close()
    out["two_over_one"] = round(out["tok_s_2_worker"] / out["tok_s_1_worker"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--tokens-before", type=int, default=10)
    ap.add_argument("--zipf-adapters", type=int, default=0)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--zipf-requests", type=int, default=96)
    ap.add_argument("--zipf-clients", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.zipf_adapters:
        emit(zipf_adapters(args), args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "models" / "tiny", "llama")
        serve = Server(tmp / "serve", "--model", f"tiny={model}", kv=KV,
                       weights=WEIGHTS).start()
        try:
            base = closed_loop(serve.url, "tiny", args.clients, args.requests,
                               args.max_tokens)
        finally:
            serve.stop()
        c = Cluster(tmp / "models", tmp / "cluster", threads=0,
                    worker_toml=POOL_TOML.format(kv=KV, weights=WEIGHTS))
        try:
            c.start_worker("w1")
            gw = c.gateway("--model", f"tiny={model}")
            try:
                cluster = closed_loop(gw.url, "tiny", args.clients, args.requests,
                                      args.max_tokens)
                c.start_worker("w2")
                kill = failover(c, gw, "tiny", "kill", args.tokens_before, args.trials, 100,
                                warm_target=True)
                cold = failover(c, gw, "tiny", "kill", args.tokens_before, args.trials, 100,
                                warm_target=False)
                lost = failover(c, gw, "tiny", "stop", args.tokens_before, args.trials, 100,
                                warm_target=True)
            finally:
                gw.stop()
        finally:
            c.close()
    emit({
        "cpu": cpu_flags(),
        "model": "tiny random llama (tests/factories.py), fp32, CPU",
        "engine": POOL_TOML.format(kv=KV, weights=WEIGHTS).strip().replace("\n", "; "),
        "serve_median_ttft_ms": base["median_ttft_ms"],
        "gateway_median_ttft_ms": cluster["median_ttft_ms"],
        "gateway_added_ttft_ms": cluster["median_ttft_ms"] - base["median_ttft_ms"],
        "serve_median_tok_s": base["median_tok_s"],
        "gateway_median_tok_s": cluster["median_tok_s"],
        "gateway_vs_serve_tok_s": cluster["median_tok_s"] / base["median_tok_s"],
        "failover_kill_median_s": statistics.median(kill),
        "failover_kill_s": kill,
        "failover_kill_cold_target_median_s": statistics.median(cold),
        "failover_kill_cold_target_s": cold,
        "failover_lost_node_median_s": statistics.median(lost),
        "failover_lost_node_s": lost,
        "heartbeat_ttl_s": c.ttl_s,
        "migration_limit": 3,
    }, args.json)


if __name__ == "__main__":
    main()
