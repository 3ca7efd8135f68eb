"""Synthetic multi-model workloads: Poisson arrivals per model, Zipf-skewed popularity, and
log-normal prompt/output lengths fitted to a mean and a median (defaults: the ShareGPT-derived
statistics in scheduler/data/workload_lengths.csv, input mean ~700 / p50 ~600, output mean ~300 /
p50 ~265)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadRequest:
    model: str
    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthDist:
    mean: float
    median: float
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        sigma = math.sqrt(2 * math.log(max(self.mean / self.median, 1.0 + 1e-9)))
        return int(min(self.hi, max(self.lo, round(rng.lognormvariate(math.log(self.median),
                                                                      sigma)))))


SHAREGPT_INPUT = LengthDist(mean=700, median=600, lo=16, hi=4096)
SHAREGPT_OUTPUT = LengthDist(mean=300, median=265, lo=16, hi=2048)


def zipf_rates(models: list[str], total_rate: float, skew: float) -> dict[str, float]:
    """Per-model arrival rates summing to ``total_rate``; model i gets weight 1/(i+1)^skew."""
    weights = [1.0 / (i + 1) ** skew for i in range(len(models))]
    return {m: total_rate * w / sum(weights) for m, w in zip(models, weights)}


def poisson_workload(rates: dict[str, float], duration_s: float, inputs: LengthDist,
                     outputs: LengthDist, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    reqs = []
    for model, rate in rates.items():
        t = 0.0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= duration_s:
                break
            reqs.append(WorkloadRequest(model, t, inputs.sample(rng), outputs.sample(rng)))
    return sorted(reqs, key=lambda r: r.arrival)
