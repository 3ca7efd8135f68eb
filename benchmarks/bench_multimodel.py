"""Many models on one device: SLO attainment per scheduling policy (token, request, fcfs).

Default (this CPU), chosen to resemble Aegaeon's setting (many models, each at a low rate,
long decodes, a device whose weight memory holds only a few of them):
  - 8 Llama models (hidden 128, 2 layers, vocabulary 32000, untied: ~32 MiB of fp32 weights
    each, so a switch is a real copy of about one decode step: measured 1.5 ms against
    0.7 ms steps on an avx512 CPU, 3 ms against 4 ms on an avx2-only one) and an arena whose
    weight region holds 2 of them;
  - Poisson arrivals, Zipf(1.0) popularity over the models; prompts log-normal mean/median
    64/50 tokens, outputs 96/80 (long decodes: ~100x the prompt's prefill steps);
  - SLO TTFT 1 s, TBT 100 ms. Relative to a step (~1-5 ms) the TBT is looser than
    Aegaeon's (100 ms vs ~10 ms steps on H800) and the TTFT (~6x a request's full-speed
    service time here, ~3x in Aegaeon's traces) is looser for the request-level baseline.
For each policy and total arrival rate, requests arrive for --duration seconds into a running
engine with weight prefetch on (``PoolConfig.prefetch``; token and request are run again with
it off, keys ``*_noprefetch``, unless --no-compare-prefetch); greedy, ignore_eos, max_tokens
= the sampled output length. Attainment two ways:
``*_attainment`` = share of requests meeting TTFT and mean TPOT (vLLM goodput, strict) and
``*_aegaeon_score`` = Aegaeon's time-based per-token score. Reports the highest rate with >=
90% per policy for both, and ``rate_ratio_token_vs_request`` (goodput) /
``rate_ratio_token_vs_request_aegaeon``. Rates are tried in increasing order and a policy
stops after two rates below 50% goodput (the rest are reported as not run). The request
policy is a faithful request-level policy: same continuous batching and chunked prefill, it
only keeps the device until the model's queue drains.

--simulate: the same policy and scheduler objects in the discrete-event simulator with H100
step times from scheduler/data (qwen2.5-7B, yi-1.5-9B, llama2-13B in rotation), ShareGPT-like
lengths, 0.1 req/s per model, SLO TTFT 10 s / TBT 100 ms, 2 models resident per GPU; for n
models per GPU the attainment per policy, and the most models per GPU with >= 90% (x 16
GPUs for the cluster, each GPU serving its own share of the models). Four settings: switch
cost from the artifact's pessimistic estimate or a bulk copy at 80% of PCIe bandwidth, each
with copies stalling the device (the engine with prefetch off) or prefetched beside compute
(the engine's default, Aegaeon-style). --sim-int4 adds the last setting with the models'
weights 4-bit (0.75 B a weight, ``models/sizes.py``): as many resident as fit in the memory
that holds 2 fp16 ones (5), switches 0.375x as long, step times the fp16 tables'.
--plot DIR (off by default; needs matplotlib, a dev dependency): also write PNGs into DIR
(created) and print their paths (to stderr; the result gains a ``plots`` key). Engine mode:
cpu_attainment_vs_rate.png (goodput and Aegaeon's score against the total rate, per policy)
and cpu_timeline.png (which model each engine step ran, token vs request policy, at one rate:
where the token policy meets 90% and leads most; per-step records taken by wrapping the
engine core's scheduler and cost model from here, engine code unchanged). --simulate:
sim_attainment_by_models.png, sim_models_per_gpu.png and sim_timeline.png (one more simulated
GPU, bulk copy with prefetch, at the most models the token policy serves at 90%, traced).

Run times measured on a 2-core avx512 CPU (AMD EPYC), --plot included: engine mode with the
defaults ~4.5 min (5 runs of up to 6 rates x 6 s), with --quick (rates 2.5-40, 3 s each,
prefetch comparison off) ~2.2 min; --simulate with the defaults ~6 min (1200 s sweeps of up
to 10 models x 4 settings x 3 policies, then the 16-device cluster), with --quick (300 s, up
to 8 models, no cluster) ~45 s. --plot itself adds a few seconds (--simulate: one more
traced run per policy).
Usage: python3 benchmarks/bench_multimodel.py [--json] [--simulate] [--quick] [--plot DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit, load_tests_package  # noqa: E402

load_tests_package()

from gpupool.scheduler.metrics import RequestTiming, attainment  # noqa: E402
from gpupool.scheduler.simulator import DEFAULT_DATA_DIR, StepRecord  # noqa: E402
from gpupool.scheduler.slo import SLO  # noqa: E402
from gpupool.scheduler.workload import LengthDist, poisson_workload, zipf_rates  # noqa: E402

TARGET = 0.9
# option -> (default, with --quick): --quick makes a plot-sized run (see the docstring)
DEFAULTS = {"rates": ("2.5,5,10,20,40,80", "2.5,5,10,20,40"), "duration": (6.0, 3.0),
            "compare_prefetch": (True, False), "max_models": (10, 8),
            "sim_duration": (1200.0, 300.0), "cluster_devices": (16, 0),
            "cluster_duration": (300.0, 300.0)}


def best_rate(curve: dict[float, float]) -> float:
    ok = [r for r, a in sorted(curve.items()) if a >= TARGET]
    return max(ok) if ok else 0.0


def make_model(folder: Path, args, seed: int) -> Path:
    """A random Llama model of the benchmark's size, with the tests' word-level tokenizer."""
    import torch
    import transformers

    from tests.factories import make_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=2,
        bos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


def run_engine(args) -> dict:
    import statistics

    import torch

    from gpupool import Engine, SamplingParams
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout

    root = Path(tempfile.mkdtemp(prefix="gpupool-bench-mm-"))
    names = [f"m{i}" for i in range(args.models)]
    folders = {n: make_model(root / n, args, seed=i) for i, n in enumerate(names)}
    nbytes = build_layout(ModelConfig.from_folder(folders["m0"]), torch.float32).num_bytes
    slo = SLO(ttft_ms=1000, tbt_ms=100)
    inputs, outputs = LengthDist(64, 50, 8, 256), LengthDist(96, 80, 16, 256)
    result = {"device": "cpu", "models": args.models, "resident_models": 2,
              "model": f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}",
              "weights_mib_per_model": round(nbytes / 2**20, 1),
              "slo_ms": [slo.ttft_ms, slo.tbt_ms], "duration_s": args.duration,
              "zipf_skew": 1.0, "prompt_mean_median": [64, 50], "output_mean_median": [96, 80]}
    if args.plot:
        result["cpu"] = cpu_flags()
    rates = [float(r) for r in args.rates.split(",")]
    swaps, steps = [], []
    traces: dict[str, dict[float, list]] = {}  # policy -> rate -> StepRecords (--plot)
    runs = [("token", True), ("request", True), ("fcfs", True)]
    if args.compare_prefetch:
        runs += [("token", False), ("request", False)]
    for policy, prefetch in runs:
        label = policy if prefetch else f"{policy}_noprefetch"
        engine = Engine(device="cpu", policy=policy, weight_bytes=2 * nbytes,
                        kv_cache_bytes=256 << 20, kv_page_bytes=64 << 10,
                        ttft_ms=slo.ttft_ms, tbt_ms=slo.tbt_ms, prefetch=prefetch)
        for n in names:
            engine.add_model(n, folders[n])
        tracer = StepTracer(engine.local.core) if args.plot and prefetch else None
        curve, scores, low = {}, {}, 0
        for rate in rates:
            if low >= 2:
                break
            reqs = poisson_workload(zipf_rates(names, rate, 1.0), args.duration, inputs,
                                    outputs, seed=args.seed + int(rate * 100))
            if tracer:
                tracer.restart()
            timings = drive(engine, reqs, SamplingParams)
            if tracer:
                traces.setdefault(policy, {})[rate] = tracer.records
            a = attainment(timings, slo)
            curve[rate], scores[rate] = a["slo_attainment"], a["aegaeon_score"]
            low = low + 1 if curve[rate] < 0.5 else 0
        if not prefetch:
            swaps += list(engine.local.core.cost.swap_s.values())
        steps += list(engine.local.core.cost.step_s.values())
        w = engine.local.weights
        result[f"{label}_weight_copies"] = {
            "waited_for": w.num_swaps, "prefetched": w.num_prefetches,
            "prefetch_hits": w.prefetch_hits, "prefetch_wasted": w.prefetch_wasted,
            "seconds_waited": round(w.swap_seconds, 3)}
        engine.shutdown()
        result[f"{label}_attainment"] = {str(r): round(a, 3) for r, a in curve.items()}
        result[f"{label}_aegaeon_score"] = {str(r): round(a, 3) for r, a in scores.items()}
        result[f"{label}_max_rate_at_90"] = best_rate(curve)
        result[f"{label}_max_rate_at_90_aegaeon"] = best_rate(scores)
    if swaps:  # a full copy, learned where nothing is prefetched
        result["measured_switch_ms_median"] = round(1000 * statistics.median(swaps), 2)
    result["measured_step_ms_median"] = round(1000 * statistics.median(steps), 2)
    for suffix in ("", "_aegaeon"):
        for pre in ("", "_noprefetch") if args.compare_prefetch else ("",):
            req = result[f"request{pre}_max_rate_at_90{suffix}"]
            result[f"rate_ratio_token_vs_request{pre}{suffix}"] = (
                round(result[f"token{pre}_max_rate_at_90{suffix}"] / req, 2) if req else None)
    if args.plot:
        result["plots"] = plot_engine(args, result, traces)
    return result


class StepTracer:
    """Per-step records (``StepRecord``, seconds since ``restart``) of a running engine, taken
    from outside: the engine core's ``scheduler.schedule`` (the batch), ``cost.observe_swap``
    (the wait for a weight copy, before the step) and ``cost.observe_step`` (the step's
    compute time, after it) are wrapped on those instances, no engine code changed. A
    ``switched`` step ran another model than the step before; ``wait_s`` is what the engine
    reported waiting for that model's weights (a copy, or the rest of a prefetch)."""

    def __init__(self, core):
        self.records: list = []
        self.t0 = time.monotonic()
        self._out, self._wait, self._last = None, 0.0, None
        sched, cost = core.scheduler, core.cost
        schedule, observe_swap, observe_step = (sched.schedule, cost.observe_swap,
                                                cost.observe_step)

        def traced_schedule(*a, **k):
            self._out, self._wait = schedule(*a, **k), 0.0
            return self._out

        def traced_swap(model, seconds):
            self._wait = seconds
            observe_swap(model, seconds)

        def traced_step(model, seconds, num_tokens=0, prefill_tokens=0):
            end = time.monotonic() - self.t0
            out = self._out
            rows = len(out.scheduled) if out is not None and out.model == model else 0
            self.records.append(StepRecord(end - seconds, end, model, rows, num_tokens,
                                           prefill_tokens, model != self._last, self._wait))
            self._last, self._wait = model, 0.0
            observe_step(model, seconds, num_tokens, prefill_tokens)

        sched.schedule, cost.observe_swap, cost.observe_step = (traced_schedule, traced_swap,
                                                               traced_step)

    def restart(self) -> None:
        """A fresh list and clock origin (the next run's first arrival)."""
        self.records, self.t0, self._last = [], time.monotonic(), None


def plot_engine(args, result: dict, traces: dict) -> list[str]:
    """--plot for the engine mode; the timeline at the rate where the token policy meets 90%
    goodput and leads the request policy most (the lowest such), else the highest rate both
    policies ran."""
    import plots

    common = sorted(set(traces.get("token", {})) & set(traces.get("request", {})))
    rate = None
    if common:
        tok, req = result["token_attainment"], result["request_attainment"]
        ok = [r for r in common if tok[str(r)] >= TARGET]
        rate = (max(ok, key=lambda r: (tok[str(r)] - req[str(r)], -r)) if ok
                else common[-1])
        result["timeline_rate"] = rate
    chosen = {p: traces[p][rate] for p in ("token", "request")} if rate is not None else {}
    paths = plots.write_engine_plots(result, chosen, args.plot, window_s=args.window,
                                     rate=rate)
    return report_plots(paths)


def report_plots(paths) -> list[str]:
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return [str(p) for p in paths]


def drive(engine, reqs, SamplingParams) -> list[RequestTiming]:
    """Submit each request at its arrival time; collect token times until all finish."""
    lock, done = threading.Lock(), threading.Event()
    times: dict[int, list[float]] = {}
    arrivals: dict[int, float] = {}
    remaining = [len(reqs)]

    def sink_for(i):
        def sink(out):
            now = time.monotonic()
            with lock:
                times[i].extend([now] * len(out.token_ids))  # an OutputDelta
                if out.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
        return sink

    start = time.monotonic()
    for i, r in enumerate(reqs):
        delay = start + r.arrival - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with lock:
            times[i], arrivals[i] = [], time.monotonic()
        params = SamplingParams(max_tokens=r.output_tokens, temperature=0, ignore_eos=True)
        engine.add_request([5 + (k % 150) for k in range(r.prompt_tokens)], params,
                           model=r.model, sink=sink_for(i))
    if reqs:
        done.wait(timeout=600)
    return [RequestTiming(r.model, arrivals[i], tuple(times[i])) for i, r in enumerate(reqs)]


def run_simulation(args) -> dict:
    from gpupool.models.sizes import model_element_bytes
    from gpupool.scheduler.simulator import DeviceConfig, load_sim_models, simulate_device
    from gpupool.scheduler.workload import SHAREGPT_INPUT, SHAREGPT_OUTPUT

    data = Path(args.data)
    bases = ["qwen2_5_7b", "yi1_5_9b_chat", "llama2_13b_chat"]
    slo = SLO(ttft_ms=10_000, tbt_ms=100)
    result = {"gpu": "H100", "gpus": 16, "rate_per_model": 0.1, "slo_ms": [10_000, 100],
              "resident_models": 2, "duration_s": args.sim_duration,
              "cost_model": "scheduler/data step_times.csv (vLLM fp16 measured), interpolated",
              "attainment": "goodput (TTFT and mean TPOT); *_aegaeon: Aegaeon's time score"}
    settings = [(label, eff, prefetch, 1.0, 2, args.max_models)
                for label, eff, prefetch in (("pessimistic_switch", None, False),
                                             ("bulk_copy_switch", 0.8, False),
                                             ("pessimistic_switch_prefetch", None, True),
                                             ("bulk_copy_switch_prefetch", 0.8, True))]
    if args.sim_int4:  # the same device memory holding 4-bit weights (groups of 32)
        ratio = model_element_bytes("bfloat16", "int4") / 2
        settings.append(("int4_bulk_copy_switch_prefetch", 0.8, True, ratio, int(2 / ratio),
                         3 * args.max_models))
        result["int4"] = (f"weights {ratio:.3f}x fp16's bytes (0.75 B a weight: groups of "
                          f"32), so {int(2 / ratio)} resident where fp16 has 2 and switches "
                          f"{ratio:.3f}x as long; step times the fp16 tables' (no measured "
                          "4-bit GPU steps: at small batches a 4-bit step reads fewer bytes)")
    for label, eff, prefetch, ratio, resident, max_models in settings:
        best, best_a = {}, {}
        for policy in ("token", "request", "fcfs"):
            per_n, per_n_a, low = {}, {}, 0
            for n in range(1, max_models + 1):
                if low >= 2:
                    break
                names = [f"{bases[i % 3]}#{i}" for i in range(n)]
                models = load_sim_models(data, "H100", names, efficiency=eff,
                                         bytes_ratio=ratio)
                reqs = poisson_workload({m: 0.1 for m in names}, args.sim_duration,
                                        SHAREGPT_INPUT, SHAREGPT_OUTPUT, seed=n)
                res = simulate_device(models, reqs, policy, {m: slo for m in names},
                                      DeviceConfig(resident_models=resident,
                                                   prefetch=prefetch))
                a = attainment(res, slo)
                per_n[n], per_n_a[n] = a["slo_attainment"], a["aegaeon_score"]
                low = low + 1 if per_n[n] < 0.5 else 0
            best[policy] = max((n for n, a in per_n.items() if a >= TARGET), default=0)
            best_a[policy] = max((n for n, a in per_n_a.items() if a >= TARGET), default=0)
            result[f"{label}_{policy}_attainment_by_models"] = {
                str(n): round(a, 3) for n, a in per_n.items()}
            result[f"{label}_{policy}_aegaeon_score_by_models"] = {
                str(n): round(a, 3) for n, a in per_n_a.items()}
            result[f"{label}_{policy}_models_per_gpu_at_90"] = best[policy]
            result[f"{label}_{policy}_models_per_gpu_at_90_aegaeon"] = best_a[policy]
            result[f"{label}_{policy}_one_device_x16"] = best[policy] * 16  # no routing
        for suffix, b in (("", best), ("_aegaeon", best_a)):
            result[f"{label}_models_ratio_token_vs_request{suffix}"] = (
                round(b["token"] / b["request"], 2) if b["request"] else None)
    if args.cluster_devices:
        result.update(run_cluster_simulation(args, data, bases, slo))
    if args.plot:
        result["plots"] = plot_simulation(args, result, data, bases, slo)
    return result


def plot_simulation(args, result: dict, data: Path, bases: list[str], slo: SLO) -> list[str]:
    """--plot for --simulate: the sweep's figures, and a timeline from one more simulated
    GPU (bulk copy, prefetch: the engine's default) traced under the token and the request
    policy, at the most models per GPU the token policy serves at 90% (at least 2)."""
    import plots

    from gpupool.scheduler.simulator import DeviceConfig, load_sim_models, simulate_device
    from gpupool.scheduler.workload import SHAREGPT_INPUT, SHAREGPT_OUTPUT

    n = max(2, result.get("bulk_copy_switch_prefetch_token_models_per_gpu_at_90", 0))
    names = [f"{bases[i % 3]}#{i}" for i in range(n)]
    models = load_sim_models(data, "H100", names, efficiency=0.8)
    reqs = poisson_workload({m: 0.1 for m in names}, args.sim_duration, SHAREGPT_INPUT,
                            SHAREGPT_OUTPUT, seed=n)
    traces = {}
    for policy in ("token", "request"):
        traces[policy], stats = [], {}
        res = simulate_device(models, reqs, policy, {m: slo for m in names},
                              DeviceConfig(resident_models=2, prefetch=True), stats=stats,
                              trace=traces[policy])
        result[f"timeline_{policy}_attainment"] = round(attainment(res, slo)["slo_attainment"],
                                                        3)
        result[f"timeline_{policy}_switches"] = stats["switches"]
    result["timeline_models_per_gpu"] = n
    setting = (f"{n} models on one GPU (bulk copy at 80% of PCIe, prefetched, 2 resident; "
               f"goodput token {result['timeline_token_attainment']:.0%}, "
               f"request {result['timeline_request_attainment']:.0%})")
    paths = plots.write_sim_plots(result, traces, args.plot, trace_setting=setting,
                                  window_s=args.sim_window)
    return report_plots(paths)


def run_cluster_simulation(args, data, bases, slo) -> dict:
    """``--cluster-devices`` simulated devices with the gateway's Router placing every
    request (bulk copy at 0.8 efficiency, prefetch, 2 resident models per device): the most
    models the cluster serves at the 90% target, per policy, over models per device
    1, 2, ... (stopping after two misses)."""
    from gpupool.scheduler.router import Router
    from gpupool.scheduler.simulator import DeviceConfig, load_sim_models, simulate_cluster
    from gpupool.scheduler.workload import SHAREGPT_INPUT, SHAREGPT_OUTPUT

    n_dev = args.cluster_devices
    out = {"cluster_devices": n_dev, "cluster_duration_s": args.cluster_duration,
           "cluster_config": "bulk_copy_switch_prefetch, Router(resident > host-cached > "
                             "least loaded)"}
    for policy in ("token", "request"):
        per, low = {}, 0
        for k in range(1, args.max_models + 1):
            if low >= 2:
                break
            n = k * n_dev
            names = [f"{bases[i % 3]}#{i}" for i in range(n)]
            models = load_sim_models(data, "H100", names, efficiency=0.8)
            reqs = poisson_workload({m: 0.1 for m in names}, args.cluster_duration,
                                    SHAREGPT_INPUT, SHAREGPT_OUTPUT, seed=n)
            res = simulate_cluster(models, reqs, policy, {m: slo for m in names},
                                   DeviceConfig(resident_models=2, prefetch=True), n_dev,
                                   router=Router())
            per[k] = attainment(res, slo)["slo_attainment"]
            low = low + 1 if per[k] < TARGET else 0
        best = max((k for k, a in per.items() if a >= TARGET), default=0)
        out[f"cluster_{policy}_attainment_by_models_per_device"] = {
            str(k): round(a, 3) for k, a in per.items()}
        out[f"cluster_{policy}_models_per_device_at_90"] = best
        out[f"cluster_{policy}_models_at_90"] = best * n_dev
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller run, for a plot in a couple of minutes: "
                         + ", ".join(f"--{k.replace('_', '-')} {q}" for k, (d, q)
                                     in DEFAULTS.items() if d != q and k != "compare_prefetch")
                         + ", no prefetch comparison (options given win)")
    ap.add_argument("--plot", metavar="DIR", default=None,
                    help="write PNG figures into DIR (needs matplotlib)")
    ap.add_argument("--window", type=float, default=1.0,
                    help="engine mode --plot: seconds of the run the timeline shows")
    ap.add_argument("--sim-window", type=float, default=60.0,
                    help="--simulate --plot: simulated seconds the timeline shows")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--rates", default=None,
                    help=f"total requests/s to try (default {DEFAULTS['rates'][0]})")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-compare-prefetch", dest="compare_prefetch", action="store_false",
                    default=None,
                    help="skip the token and request runs with weight prefetch off")
    ap.add_argument("--max-models", type=int, default=None)
    ap.add_argument("--sim-duration", type=float, default=None)
    ap.add_argument("--cluster-devices", type=int, default=None,
                    help="with --simulate: also simulate this many devices behind the "
                         "gateway's router (0: skip; default 16)")
    ap.add_argument("--cluster-duration", type=float, default=None)
    ap.add_argument("--sim-int4", action="store_true",
                    help="with --simulate: also the bulk-copy, prefetch setting with 4-bit "
                         "weights (more resident, shorter switches; up to 3x --max-models)")
    ap.add_argument("--data", default=str(DEFAULT_DATA_DIR),
                    help="folder of the measured tables (default: the package's copy)")
    args = ap.parse_args()
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    logging.basicConfig(level=logging.WARNING)
    emit(run_simulation(args) if args.simulate else run_engine(args), args.json)


if __name__ == "__main__":
    main()
