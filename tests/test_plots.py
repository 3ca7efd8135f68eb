"""The simulator's step trace and benchmarks/plots.py's PNG figures (bench_multimodel --plot)."""

import sys
from pathlib import Path

import pytest

from gpupool.scheduler.metrics import attainment
from gpupool.scheduler.simulator import (
    DEFAULT_DATA_DIR,
    DeviceConfig,
    StepRecord,
    load_sim_models,
    simulate_device,
)
from gpupool.scheduler.slo import SLO
from gpupool.scheduler.workload import SHAREGPT_INPUT, SHAREGPT_OUTPUT, poisson_workload

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import plots  # noqa: E402  benchmarks/plots.py; needs matplotlib (the dev extra)

PNG = b"\x89PNG\r\n\x1a\n"
SLO_SIM = SLO(ttft_ms=10_000, tbt_ms=100)


@pytest.fixture(scope="module")
def run():
    """3 models on one simulated H100 for 120 s, traced, under the token and request policy."""
    names = [f"qwen2_5_7b#{i}" for i in range(3)]
    models = load_sim_models(DEFAULT_DATA_DIR, "H100", names, efficiency=0.8)
    reqs = poisson_workload({m: 0.1 for m in names}, 120.0, SHAREGPT_INPUT, SHAREGPT_OUTPUT,
                            seed=7)
    out = {}
    for policy in ("token", "request"):
        trace, stats = [], {}
        res = simulate_device(models, reqs, policy, {m: SLO_SIM for m in names},
                              DeviceConfig(resident_models=2, prefetch=policy == "token"),
                              stats=stats, trace=trace)
        out[policy] = (trace, stats, res)
    return names, reqs, out


def assert_png(path: Path, min_bytes: int = 10_000, max_bytes: int = 400_000):
    data = Path(path).read_bytes()
    assert data[:8] == PNG, path
    assert min_bytes < len(data) < max_bytes, (path, len(data))


def test_trace_is_consistent_with_the_simulator(run):
    names, reqs, out = run
    for policy, (trace, stats, res) in out.items():
        assert len(res) == len(reqs)
        assert trace and all(isinstance(r, StepRecord) for r in trace)
        assert len(trace) == stats["steps"]
        assert {r.model for r in trace} <= set(names)
        assert len({r.model for r in trace}) > 1
        for a, b in zip(trace, trace[1:]):  # one device: no two steps (or waits) overlap
            assert a.t_end <= b.t_start - b.wait_s + 1e-9, (policy, a, b)
        assert all(r.t_end > r.t_start and r.wait_s >= 0 and r.rows > 0 for r in trace)
        assert sum(r.switched for r in trace) == stats["switches"] > 1
        assert sum(r.wait_s for r in trace) == pytest.approx(stats["stall_s"])
        assert sum(r.t_end - r.t_start for r in trace) == pytest.approx(stats["busy_s"])
        assert trace[-1].t_end == pytest.approx(stats["end_s"])
        # every output token is sampled by some step: decode rows + finished prefills
        assert sum(r.tokens for r in trace) >= sum(q.output_tokens for q in reqs)


def test_trace_is_off_by_default():
    names = ["qwen2_5_7b#0"]
    models = load_sim_models(DEFAULT_DATA_DIR, "H100", names, efficiency=0.8)
    reqs = poisson_workload({names[0]: 0.1}, 30.0, SHAREGPT_INPUT, SHAREGPT_OUTPUT, seed=1)
    from gpupool.scheduler.simulator import SimDevice

    dev = SimDevice(models, "token", {names[0]: SLO_SIM}, DeviceConfig())
    assert dev.trace is None
    assert simulate_device(models, reqs, "token", {names[0]: SLO_SIM}, DeviceConfig())


def test_timeline_png_marks_every_switch(run, tmp_path):
    names, _, out = run
    traces = {p: trace for p, (trace, _, _) in out.items()}
    path, shown = plots.plot_timeline(traces, tmp_path / "timeline.png",
                                      "simulator test, 3 models", models=names,
                                      time_label="simulated time (s)")
    assert_png(path)
    for policy, (trace, stats, _) in out.items():
        assert shown[policy]["steps"] == len(trace)
        assert shown[policy]["switches"] == stats["switches"]  # one triangle per switch
        assert shown[policy]["wait_s"] == pytest.approx(stats["stall_s"])
    win = plots.busiest_window(traces["token"], 30.0)
    assert win[1] - win[0] == pytest.approx(30.0)
    _, part = plots.plot_timeline(traces, tmp_path / "window.png", "window", window=win)
    assert 0 < part["token"]["steps"] < len(traces["token"])
    assert_png(tmp_path / "window.png")


def test_sweep_figures_from_result_dicts(run, tmp_path):
    names, _, out = run
    rates = {"token": {"2.5": 1.0, "5.0": 0.95, "10.0": 0.7},
             "request": {"2.5": 0.92, "5.0": 0.6, "10.0": 0.3},
             "fcfs": {"2.5": 0.5, "5.0": 0.2},
             "token_noprefetch": {"2.5": 1.0, "5.0": 0.8}}
    engine = {"device": "cpu", "models": 8, "resident_models": 2, "slo_ms": [1000, 100],
              "duration_s": 3.0, "model": "llama test", "weights_mib_per_model": 32.0}
    for p, c in rates.items():
        engine[f"{p}_attainment"] = c
        engine[f"{p}_aegaeon_score"] = {k: min(1.0, v + 0.05) for k, v in c.items()}
        engine[f"{p}_max_rate_at_90"] = max((float(k) for k, v in c.items() if v >= 0.9),
                                            default=0.0)
    traces = {p: trace for p, (trace, _, _) in out.items()}
    paths = plots.write_engine_plots(engine, traces, tmp_path / "engine", window_s=20.0,
                                     rate=5.0)
    assert [p.name for p in paths] == ["cpu_attainment_vs_rate.png", "cpu_timeline.png"]

    sim = {"gpu": "H100", "rate_per_model": 0.1, "slo_ms": [10_000, 100],
           "resident_models": 2, "duration_s": 120.0, "cluster_devices": 4,
           "cluster_token_models_per_device_at_90": 3,
           "cluster_request_models_per_device_at_90": 1}
    for setting in ("bulk_copy_switch", "bulk_copy_switch_prefetch"):
        for policy in ("token", "request", "fcfs"):
            trace, stats, res = out.get(policy, out["request"])
            a = attainment(res, SLO_SIM)
            sim[f"{setting}_{policy}_attainment_by_models"] = {"1": 1.0, "2": 0.95,
                                                               "3": a["slo_attainment"]}
            sim[f"{setting}_{policy}_aegaeon_score_by_models"] = {"1": 1.0, "2": 0.97,
                                                                  "3": a["aegaeon_score"]}
            sim[f"{setting}_{policy}_models_per_gpu_at_90"] = 2
            sim[f"{setting}_{policy}_models_per_gpu_at_90_aegaeon"] = 3
    paths += plots.write_sim_plots(sim, traces, tmp_path / "sim", trace_setting="3 models",
                                   window_s=30.0)
    assert [p.name for p in paths[2:]] == ["sim_attainment_by_models.png",
                                           "sim_models_per_gpu.png", "sim_timeline.png"]
    for p in paths:
        assert_png(p)


def test_bench_multimodel_simulate_plot_writes_pngs(tmp_path):
    """``bench_multimodel.py --simulate --plot DIR`` end to end, at a tiny setting."""
    import json
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_multimodel.py"
    out = subprocess.run([sys.executable, str(bench), "--simulate", "--quick", "--json",
                          "--max-models", "2", "--sim-duration", "60", "--sim-window", "20",
                          "--plot", str(tmp_path / "png")],
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    names = ["sim_attainment_by_models.png", "sim_models_per_gpu.png", "sim_timeline.png"]
    assert result["plots"] == [str(tmp_path / "png" / n) for n in names]
    assert all(f"wrote {p}" in out.stderr for p in result["plots"])
    assert "bulk_copy_switch_prefetch_token_attainment_by_models" in result
    for p in result["plots"]:
        assert_png(Path(p))
