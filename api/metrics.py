"""Prometheus metrics (prometheus-client), one registry per app.

Counters and histograms are updated by the routes; pool figures (queue depth, swaps, KV and
weight occupancy) come from the engine client's ``stats()``, which the /metrics route asks
for before each scrape (``Metrics.pool_stats``).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


class _PoolCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics.pool_stats
        if s is None:  # no scrape yet
            return
        queue = GaugeMetricFamily("gpupool_queue_depth", "Requests per model and state",
                                  labels=["model", "state"])
        resident = GaugeMetricFamily("gpupool_model_resident",
                                     "1 when the model's weights are in the arena",
                                     labels=["model"])
        pq = CounterMetricFamily("gpupool_prefix_cache_queries",
                                 "Prompt tokens looked up in the prefix cache", labels=["model"])
        ph = CounterMetricFamily("gpupool_prefix_cache_hits",
                                 "Prompt tokens found in the prefix cache", labels=["model"])
        # vLLM's names for the same (label model_name)
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Requests in the running batch (vLLM's name)",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Requests waiting (vLLM's name)", labels=["model_name"])
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters with running and waiting requests (vLLM's "
            "name; the value is the scrape time)",
            labels=["model_name", "running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        now = time.time()
        for name, m in s["models"].items():
            queue.add_metric([name, "waiting"], m["waiting"])
            queue.add_metric([name, "running"], m["running"])
            resident.add_metric([name], 1.0 if m["resident"] else 0.0)
            pq.add_metric([name], m.get("prefix_cache_queries", 0))
            ph.add_metric([name], m.get("prefix_cache_hits", 0))
            running.add_metric([name], m["running"])
            waiting.add_metric([name], m["waiting"])
            lora.add_metric([name, ",".join(m.get("running_adapters", ())),
                             ",".join(m.get("waiting_adapters", ())),
                             str(m.get("adapter_slots", 0))], now)
        yield from (queue, resident, pq, ph, running, waiting, lora)
        p = s["kv_pages"]
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc",
                                "KV pages held by requests, 0 to 1 (vLLM's name; cached "
                                "prefix pages nobody holds count as free)",
                                value=p["used"] / p["total"] if p["total"] else 0.0)
        kv = GaugeMetricFamily("gpupool_kv_pages", "KV cache pages", labels=["where", "state"])
        kv.add_metric(["device", "used"], p["used"])
        kv.add_metric(["device", "free"], p["free"])
        kv.add_metric(["device", "cached"], p.get("cached", 0))
        kv.add_metric(["host", "used"], p["host_used"])
        kv.add_metric(["host", "free"], p["host_total"] - p["host_used"])
        yield kv
        arena = GaugeMetricFamily("gpupool_arena_bytes", "Arena regions",
                                  labels=["region", "state"])
        w = s["arena"]["weights"]
        arena.add_metric(["weights", "total"], w["bytes"])
        arena.add_metric(["weights", "used"], w["used_bytes"])
        arena.add_metric(["adapters", "total"], s["arena"]["adapters"]["bytes"])
        arena.add_metric(["kv", "total"], s["arena"]["kv"]["bytes"])
        yield arena
        sw = s["swaps"]
        c = CounterMetricFamily("gpupool_swaps", "Swaps into the arena", labels=["kind"])
        c.add_metric(["weights"], sw["weight_swaps"])
        c.add_metric(["kv_pages_in"], sw["kv_pages_in"])
        c.add_metric(["kv_pages_out"], sw["kv_pages_out"])
        yield c
        b = CounterMetricFamily("gpupool_swap_bytes", "Bytes swapped", labels=["kind"])
        b.add_metric(["weights"], sw["weight_bytes"])
        b.add_metric(["kv"], sw["kv_bytes"])
        yield b
        t = CounterMetricFamily("gpupool_swap_seconds", "Seconds spent swapping weights in",
                                labels=["kind"])
        t.add_metric(["weights"], sw["weight_seconds"])
        yield t
        pf = CounterMetricFamily("gpupool_weight_prefetches",
                                 "Weight copies started ahead of need, by what became of them",
                                 labels=["outcome"])
        pf.add_metric(["started"], sw["weight_prefetches"])
        pf.add_metric(["used"], sw["weight_prefetch_hits"])
        pf.add_metric(["wasted"], sw["weight_prefetches_wasted"])
        yield pf
        cluster = s.get("cluster")
        if cluster:  # a gateway over a cluster of workers
            w = GaugeMetricFamily("gpupool_cluster_workers", "Workers by state",
                                  labels=["state"])
            w.add_metric(["alive"], cluster["workers_alive"])
            w.add_metric(["dead"], cluster["workers_dead"])
            yield w
            yield CounterMetricFamily("gpupool_cluster_redispatched_requests",
                                      "Requests moved to another worker after theirs died",
                                      value=cluster["redispatched"])
            routes = CounterMetricFamily("gpupool_cluster_routes",
                                         "Routing decisions of this gateway by reason",
                                         labels=["reason"])
            for reason, n in sorted(cluster["routes"].items()):
                routes.add_metric([reason], n)
            yield routes


class Metrics:
    def __init__(self):
        self.pool_stats: dict | None = None  # the engine's last stats snapshot, as a dict
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpupool_requests", "Finished requests",
                                ["model", "tenant", "status"], registry=r)
        self.prompt_tokens = Counter("gpupool_prompt_tokens", "Prompt tokens",
                                     ["model", "tenant"], registry=r)
        self.generation_tokens = Counter("gpupool_generation_tokens", "Generated tokens",
                                         ["model", "tenant"], registry=r)
        self.slo_requests = Counter(
            "gpupool_slo_requests", "Finished choices by whether they met the model's SLOs "
            "(time to first token, and mean time per output token after it)",
            ["model", "outcome"], registry=r)
        self.ttft = Histogram("gpupool_time_to_first_token_seconds",
                              "From request arrival to its first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("gpupool_time_between_tokens_seconds",
                             "Between consecutive tokens of a request", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        # the same under vLLM's names (label model_name), so a dashboard made for vLLM reads
        # gpupool; the gauges are in _PoolCollector
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds",
                                   "Time to first token (vLLM's name)", ["model_name"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds",
                                  "Inter-token latency (vLLM's name)", ["model_name"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens (vLLM's name)",
                                          ["model_name"], registry=r)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens",
                                              "Generated tokens (vLLM's name)",
                                              ["model_name"], registry=r)
        r.register(_PoolCollector(self))

    def prune(self, models, tenants) -> None:
        """Drop the series of models, adapters and tenants that no longer exist, so names
        added and deleted over a server's life do not pile up (reads prometheus_client's
        label table: it has no public way to list a metric's series)."""
        keep = {"model": set(models), "model_name": set(models),
                "tenant": set(tenants) | {""}}
        for metric in (self.requests, self.slo_requests, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.tbt, self.vllm_ttft,
                       self.vllm_itl, self.vllm_prompt_tokens, self.vllm_generation_tokens):
            names = metric._labelnames
            for values in list(metric._metrics):
                if any(v not in keep[n] for n, v in zip(names, values) if n in keep):
                    metric.remove(*values)
