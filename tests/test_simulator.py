"""Attainment metrics, workloads and the discrete-event simulator."""


import pytest

from gpupool.scheduler.metrics import RequestTiming, aegaeon_score, attainment, meets_slo
from gpupool.scheduler.simulator import (
    DEFAULT_DATA_DIR,
    DeviceConfig,
    TableCost,
    load_sim_models,
    simulate_device,
)
from gpupool.scheduler.slo import SLO
from gpupool.scheduler.workload import (
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    LengthDist,
    poisson_workload,
    zipf_rates,
)

DATA = DEFAULT_DATA_DIR
SLO_1S = SLO(ttft_ms=1000, tbt_ms=100)


def test_goodput_slo_needs_both_ttft_and_tpot():
    on_time = RequestTiming("m", 0.0, (0.5, 0.6, 0.7))
    slow_start = RequestTiming("m", 0.0, (1.5, 1.6))
    slow_tokens = RequestTiming("m", 0.0, (0.5, 0.8, 1.1))  # 300 ms per token
    assert meets_slo(on_time, SLO_1S)
    assert not meets_slo(slow_start, SLO_1S) and not meets_slo(slow_tokens, SLO_1S)
    assert attainment([on_time, slow_start, slow_tokens], SLO_1S)["slo_attainment"] == 1 / 3


def test_aegaeon_score_counts_time_behind_deadlines():
    # deadlines 1.0, 1.1; tokens at 1.5 and 1.6: behind from 1.0 to 1.6 of a 1.6 s life
    late = RequestTiming("m", 0.0, (1.5, 1.6))
    assert aegaeon_score(late, SLO_1S) == pytest.approx(1 - 0.6 / 1.6)
    assert aegaeon_score(RequestTiming("m", 0.0, (0.2, 0.3)), SLO_1S) == 1.0
    # early tokens are banked: a late second token is forgiven while ahead of schedule
    assert aegaeon_score(RequestTiming("m", 0.0, (0.1, 1.05)), SLO_1S) == 1.0


def test_workload_rates_and_lengths():
    rates = zipf_rates(["a", "b", "c"], 6.0, 1.0)
    assert sum(rates.values()) == pytest.approx(6.0) and rates["a"] == pytest.approx(2 * rates["b"])
    reqs = poisson_workload(rates, 200.0, LengthDist(60, 50, 8, 200), SHAREGPT_OUTPUT, seed=1)
    assert 1000 < len(reqs) < 1400  # 6 req/s for 200 s
    assert all(a.arrival <= b.arrival for a, b in zip(reqs, reqs[1:]))
    lens = sorted(r.prompt_tokens for r in reqs)
    assert 40 <= lens[len(lens) // 2] <= 60 and 8 <= lens[0] and lens[-1] <= 200


def test_table_cost_interpolates_the_measured_grid():
    cost = TableCost.from_csv(DATA / "step_times.csv", "qwen2_5_7b", "H100")
    assert cost.decode(1) == pytest.approx(0.0092, rel=0.1)  # measured ~9 ms at batch 1
    assert cost.decode(1) < cost.decode(64) < cost.decode(150)
    assert cost.prefill(100) < cost.prefill(1000) < cost.prefill(4000)


def test_simulator_finishes_every_request_and_policies_differ_under_load():
    names = [f"qwen2_5_7b#{i}" for i in range(6)]
    models = load_sim_models(DATA, "H100", names, efficiency=0.8)
    assert models[names[0]].switch_s == pytest.approx(15569256448 / (32 * 2**30 * 0.8))
    reqs = poisson_workload({m: 0.1 for m in names}, 300.0, SHAREGPT_INPUT, SHAREGPT_OUTPUT,
                            seed=3)
    slo = SLO(ttft_ms=10_000, tbt_ms=100)
    scores = {}
    for policy in ("token", "request", "fcfs"):
        res = simulate_device(models, reqs, policy, {m: slo for m in names},
                              DeviceConfig(resident_models=2))
        assert len(res) == len(reqs)
        assert all(len(r.token_times) == q.output_tokens
                   for r, q in zip(sorted(res, key=lambda r: r.arrival), reqs))
        scores[policy] = attainment(res, slo)["slo_attainment"]
    assert len(set(scores.values())) > 1


def test_prefetch_overlaps_weight_copies_with_compute():
    names = [f"qwen2_5_7b#{i}" for i in range(4)]
    models = load_sim_models(DATA, "H100", names, efficiency=0.8)
    reqs = poisson_workload({m: 0.1 for m in names}, 200.0, SHAREGPT_INPUT, SHAREGPT_OUTPUT,
                            seed=5)
    slo = SLO(ttft_ms=10_000, tbt_ms=100)
    stats = {}
    for prefetch in (False, True):
        st = stats[prefetch] = {}
        res = simulate_device(models, reqs, "token", {m: slo for m in names},
                              DeviceConfig(resident_models=2, prefetch=prefetch), stats=st)
        assert len(res) == len(reqs) and st["switches"] > 0
        assert all(len(r.token_times) == q.output_tokens
                   for r, q in zip(sorted(res, key=lambda r: r.arrival), reqs))
    # stalls per switch: a prefetched copy has run (part of) its course before it is needed
    assert (stats[True]["stall_s"] / stats[True]["switches"]
            < stats[False]["stall_s"] / stats[False]["switches"])


def test_cluster_simulation_routes_every_request_and_keeps_each_model_together():
    from collections import Counter

    from gpupool.scheduler.simulator import simulate_cluster
    from gpupool.scheduler.workload import SHAREGPT_INPUT, SHAREGPT_OUTPUT, poisson_workload

    names = [f"qwen2_5_7b#{i}" for i in range(6)]
    models = load_sim_models(DEFAULT_DATA_DIR, "H100", names, efficiency=0.8)
    reqs = poisson_workload({m: 0.1 for m in names}, 120, SHAREGPT_INPUT, SHAREGPT_OUTPUT,
                            seed=3)
    slo = SLO(ttft_ms=10_000, tbt_ms=100)
    placed: dict = {}
    res = simulate_cluster(models, reqs, "token", {m: slo for m in names},
                           DeviceConfig(resident_models=2, prefetch=True), 3, placements=placed)
    assert len(res) == len(reqs) == len(placed)
    assert sorted(len(r.token_times) for r in res) == sorted(r.output_tokens for r in reqs)
    assert {d for d, _ in placed.values()} == {0, 1, 2}  # every device serves
    reasons = Counter(reason for _, reason in placed.values())
    assert reasons["load"] == len(names)  # only a model's first request goes by load
    for m in names:  # the rest follow it to the device that has it
        where = Counter(placed[i][0] for i, r in enumerate(reqs) if r.model == m)
        assert len(where) == 1, (m, where)
