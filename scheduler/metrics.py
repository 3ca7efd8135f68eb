"""SLO attainment of finished requests, two ways.

- ``meets_slo`` (vLLM's goodput): TTFT <= SLO.ttft and mean time per output token after the
  first <= SLO.tbt. Strict: one slow start fails the whole request.
- ``aegaeon_score`` (Aegaeon, SOSP'25): token k (k = 0, 1, ...) is due at
  ``arrival + TTFT + k * TBT``; the request earns the share of its lifetime during which it
  had produced at least as many tokens as were due.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpupool.scheduler.slo import SLO


@dataclass(frozen=True)
class RequestTiming:
    model: str
    arrival: float
    token_times: tuple[float, ...]  # absolute time of each output token


def meets_slo(r: RequestTiming, slo: SLO) -> bool:
    if not r.token_times:
        return False
    ttft = r.token_times[0] - r.arrival
    n = len(r.token_times)
    tpot = (r.token_times[-1] - r.token_times[0]) / (n - 1) if n > 1 else 0.0
    return ttft <= slo.ttft_ms / 1000 and tpot <= slo.tbt_ms / 1000


def aegaeon_score(r: RequestTiming, slo: SLO) -> float:
    if not r.token_times:
        return 0.0
    due = [slo.token_deadline(r.arrival, k) for k in range(len(r.token_times))]
    end = max(r.token_times[-1], due[-1])
    if end <= r.arrival:
        return 1.0
    events = sorted([(t, 1) for t in r.token_times] + [(d, -1) for d in due])
    behind, lead, last = 0.0, 0, r.arrival  # lead = tokens produced - tokens due
    for t, delta in events:
        if lead < 0:
            behind += t - last
        lead += delta
        last = t
    return 1.0 - behind / (end - r.arrival)


def attainment(results: list[RequestTiming], slos: dict[str, SLO] | SLO) -> dict[str, float]:
    """Share of requests meeting both SLOs, and the mean Aegaeon score."""
    if not results:
        return {"slo_attainment": 0.0, "aegaeon_score": 0.0}

    def slo(r):
        return slos if isinstance(slos, SLO) else slos[r.model]

    return {
        "slo_attainment": sum(meets_slo(r, slo(r)) for r in results) / len(results),
        "aegaeon_score": sum(aegaeon_score(r, slo(r)) for r in results) / len(results),
    }
