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
# vLLM's buckets (vllm/v1/metrics, 0.34), so quantiles compare with a vLLM server's
VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's 1-2-5 series up to its max_model_len; gpupool serves many models: up to 1M tokens
VLLM_TOKENS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= 10**6)
VLLM_PREEMPTIONS = (1, 2, 3, 4, 5, 10, 20)
VLLM_N = (1, 2, 5, 10, 20)


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
        vq = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the "
                                 "prefix cache (vLLM's name)", labels=["model_name"])
        vh = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix "
                                 "cache (vLLM's name)", labels=["model_name"])
        pre = CounterMetricFamily("vllm:num_preemptions", "Requests preempted (vLLM's name)",
                                  labels=["model_name"])
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                                  "KV pages held by requests, 0 to 1 (vLLM's name; one pool "
                                  "for every model, so each model shows the same value; "
                                  "cached prefix pages nobody holds count as free)",
                                  labels=["model_name"])
        p = s["kv_pages"]
        kv_used = p["used"] / p["total"] if p["total"] else 0.0
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
            vq.add_metric([name], m.get("prefix_cache_queries", 0))
            vh.add_metric([name], m.get("prefix_cache_hits", 0))
            pre.add_metric([name], m.get("preemptions", 0))
            usage.add_metric([name], kv_used)
            lora.add_metric([name, ",".join(m.get("running_adapters", ())),
                             ",".join(m.get("waiting_adapters", ())),
                             str(m.get("max_loras", 0))], now)
        yield from (queue, resident, pq, ph, running, waiting, lora, vq, vh, pre, usage)
        kv = GaugeMetricFamily("gpupool_kv_pages", "KV cache pages", labels=["where", "state"])
        kv.add_metric(["device", "used"], p["used"])
        kv.add_metric(["device", "free"], p["free"])
        kv.add_metric(["device", "cached"], p.get("cached", 0))
        kv.add_metric(["device", "adapters"], p.get("adapters", 0))  # adapters' copies
        kv.add_metric(["host", "used"], p["host_used"])
        kv.add_metric(["host", "free"], p["host_total"] - p["host_used"])
        yield kv
        arena = GaugeMetricFamily("gpupool_arena_bytes", "Arena regions",
                                  labels=["region", "state"])
        w = s["arena"]["weights"]
        arena.add_metric(["weights", "total"], w["bytes"])
        arena.add_metric(["weights", "used"], w["used_bytes"])
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
            by_worker = CounterMetricFamily("gpupool_cluster_worker_routes",
                                            "Requests this gateway routed to each worker",
                                            labels=["worker"])
            for worker, n in sorted(cluster.get("routes_by_worker", {}).items()):
                by_worker.add_metric([worker], n)
            yield by_worker


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
                                   buckets=VLLM_TTFT, registry=r)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds",
                                  "Inter-token latency (vLLM's name)", ["model_name"],
                                  buckets=VLLM_ITL, registry=r)
        self.vllm_success = Counter("vllm:request_success", "Finished requests by reason "
                                    "(vLLM's name)", ["model_name", "finished_reason"],
                                    registry=r)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"vllm:{name}", doc + " (vLLM's name)", ["model_name"],
                             buckets=buckets, registry=r)

        # per finished request, as vLLM records them (from the front end's arrival; the
        # queue time is the engine's, from its arrival to the first step that ran it)
        self.vllm_e2e = hist("e2e_request_latency_seconds", "Arrival to the last token",
                             VLLM_REQUEST)
        self.vllm_queue = hist("request_queue_time_seconds", "Waiting for a first step",
                               VLLM_REQUEST)
        self.vllm_prefill = hist("request_prefill_time_seconds",
                                 "First step to the first token", VLLM_REQUEST)
        self.vllm_decode = hist("request_decode_time_seconds", "First token to the last",
                                VLLM_REQUEST)
        self.vllm_inference = hist("request_inference_time_seconds",
                                   "First step to the last token", VLLM_REQUEST)
        self.vllm_tpot = hist("request_time_per_output_token_seconds",
                              "Mean time per output token after the first", VLLM_ITL)
        self.vllm_prompt_len = hist("request_prompt_tokens", "Prompt tokens", VLLM_TOKENS)
        self.vllm_gen_len = hist("request_generation_tokens", "Generated tokens", VLLM_TOKENS)
        self.vllm_max_gen = hist("request_max_num_generation_tokens",
                                 "Most tokens generated by one choice of a call", VLLM_TOKENS)
        self.vllm_req_preemptions = hist("request_num_preemptions", "Times preempted",
                                         VLLM_PREEMPTIONS)
        self.vllm_n = hist("request_params_n", "Choices asked (n)", VLLM_N)
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
                       self.generation_tokens, self.ttft, self.tbt, *self._vllm()):
            names = metric._labelnames
            for values in list(metric._metrics):
                if any(v not in keep[n] for n, v in zip(names, values) if n in keep):
                    metric.remove(*values)

    def _vllm(self) -> list:
        return [m for name, m in vars(self).items() if name.startswith("vllm_")]

    def observe_choice(self, model: str, started: float, ch, now: float) -> None:
        """vLLM's per-request series for one finished choice (``routes_openai._Choice``)."""
        last = ch.last
        self.vllm_success.labels(model, "error" if last.error else last.finish_reason).inc()
        e2e = (ch.finished_at or now) - started
        usage = ch.text.usage
        queue = min(usage.queue_s, e2e) if usage is not None else 0.0
        first = ch.first_token_at - started if ch.first_token_at is not None else e2e
        decode = (ch.last_token_at - ch.first_token_at) if ch.first_token_at is not None \
            else 0.0
        prefill = max(0.0, first - queue)
        generated = len(ch.text.token_ids)
        for metric, value in ((self.vllm_e2e, e2e), (self.vllm_queue, queue),
                              (self.vllm_prefill, prefill), (self.vllm_decode, decode),
                              (self.vllm_inference, prefill + decode),
                              (self.vllm_tpot, decode / (generated - 1) if generated > 1
                               else 0.0),
                              (self.vllm_prompt_len, len(ch.request.prompt_token_ids)),
                              (self.vllm_gen_len, generated),
                              (self.vllm_req_preemptions,
                               usage.preemptions if usage is not None else 0)):
            metric.labels(model).observe(value)
