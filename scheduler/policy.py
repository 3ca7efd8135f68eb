"""Which model runs the next step. One interface, three policies, selectable by config:

- ``token`` (default; after Aegaeon, SOSP'25): earliest token deadline first across models,
  where a request's next token is due at ``arrival + TTFT + k * TBT``; the chosen model keeps
  the device for a time quota sized so that, over a round of all busy models, each one still
  produces tokens as fast as its TBT demands after paying the switch costs:
  ``alpha_m = step_m / (HEADROOM * TBT_m)``, ``R = sum(switch) / (1 - sum(alpha))``,
  ``quota_m = max(alpha_m R, SWITCH_AMORTISE * switch_m)``. When a quota ends the model keeps
  the device unless another model's earliest deadline is due before that model could be
  switched in and served (lazy switching: a switch is paid only when a deadline needs it).
- ``request``: a model serves until its queue drains, then the oldest waiting request's model
  (request-level scaling: ServerlessLLM, Ollama).
- ``fcfs``: the model of the oldest unfinished request, switching whenever it changes.

Policies read the scheduler's integer queues and never touch a tensor; the simulator drives
the same objects with simulated time.
"""

from __future__ import annotations

from gpupool.scheduler.slo import SLO, CostModel

HEADROOM = 0.5  # plan for half the TBT: prefill steps and variance eat the rest
SWITCH_AMORTISE = 2.0  # a quota is at least this many switch times


def _oldest(seqs):
    return min(seqs, key=lambda s: s.arrival_time, default=None)


def models_with_work(sched) -> list[str]:
    return [m for m in sched.waiting if sched.waiting[m] or sched.running[m]]


class Policy:
    name = "base"
    current: str | None = None  # the model the policy last chose (for policies that stay)

    def pick(self, sched, now: float) -> str | None:
        raise NotImplementedError

    def set_slo(self, model: str, slo: SLO) -> None:
        """A model's latency objectives; policies that do not plan with SLOs ignore them."""

    def forget(self, model: str) -> None:
        """The model was removed."""
        if self.current == model:
            self.current = None


class FcfsPolicy(Policy):
    name = "fcfs"

    def pick(self, sched, now):
        heads = [s for m in sched.waiting
                 for s in (sched.running[m][:1] + list(sched.waiting[m])[:1])]
        head = _oldest(heads)
        return head.model if head else None


class RequestPolicy(Policy):
    name = "request"

    def pick(self, sched, now):
        busy = models_with_work(sched)
        if self.current in busy:
            return self.current
        head = _oldest([s for m in busy for s in list(sched.waiting[m])[:1]])
        self.current = head.model if head else (busy[0] if busy else None)
        return self.current


class TokenPolicy(Policy):
    name = "token"

    def __init__(self, cost: CostModel | None = None, slos: dict[str, SLO] | None = None,
                 default_slo: SLO | None = None):
        self.cost = cost or CostModel()
        self.slos = slos if slos is not None else {}
        self.default_slo = default_slo or SLO()
        self.quota_end = 0.0

    def set_slo(self, model: str, slo: SLO) -> None:
        self.slos[model] = slo

    def slo(self, model: str) -> SLO:
        return self.slos.get(model, self.default_slo)

    def deadline(self, sched, model: str) -> float:
        """The earliest next-token deadline among the model's unfinished requests."""
        slo = self.slo(model)
        seqs = list(sched.running[model]) + list(sched.waiting[model])
        return min(slo.token_deadline(s.arrival_time, len(s.output_token_ids)) for s in seqs)

    def quota(self, model: str, busy: list[str]) -> float:
        alpha = {m: self.cost.step(m) / (HEADROOM * self.slo(m).tbt_ms / 1000.0)
                 for m in busy}
        switch = sum(self.cost.swap(m) for m in busy) if len(busy) > 1 else 0.0
        round_s = switch / max(1.0 - sum(alpha.values()), 0.1)
        return max(alpha[model] * round_s, SWITCH_AMORTISE * self.cost.swap(model))

    def pick(self, sched, now):
        busy = models_with_work(sched)
        if not busy:
            return None
        if self.current in busy and now < self.quota_end:
            return self.current
        deadlines = {m: self.deadline(sched, m) for m in busy}
        choice = min(busy, key=deadlines.get)
        if self.current in busy and choice != self.current:
            urgent = deadlines[choice] - now < self.cost.swap(choice) + self.quota(choice, busy)
            if not urgent:  # nobody needs the device yet: no switch to pay
                choice = self.current
        self.quota_end = now + self.quota(choice, busy)
        self.current = choice
        return choice


POLICIES = {"token": TokenPolicy, "request": RequestPolicy, "fcfs": FcfsPolicy}


def make_policy(name: str, cost: CostModel | None = None, slos=None,
                default_slo: SLO | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {name!r}")
    if name == "token":
        return TokenPolicy(cost, slos, default_slo)
    return POLICIES[name]()
