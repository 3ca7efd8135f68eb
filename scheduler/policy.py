"""Which model runs the next step. One interface, three policies, selectable by config:

- ``token`` (default; after Aegaeon, SOSP'25): token-level scheduling with deadlines. A
  request's first token is due at ``arrival + TTFT``; once it has come (at ``t0``), token k is
  due at ``t0 + k * TBT`` (so its mean time between tokens meets the TBT SLO; no later than
  Aegaeon's ``arrival + TTFT + k * TBT``). Each model's deadline is its most urgent request's;
  planning uses ``deadline - margin`` (``MARGIN`` of the SLO) to absorb estimation error.
  The chosen model keeps the device for a time quota sized so that, over a round of all busy
  models, each still produces tokens at its TBT after paying the switch costs:
  ``alpha_m = step_m / (HEADROOM * TBT_m)``, ``R = sum(switch) / (1 - sum(alpha))``,
  ``quota_m = max(alpha_m R, SWITCH_AMORTISE * switch_m)``. When a quota ends the model keeps
  the device for another quota only if, after that, every other busy model can still be
  switched in and served in deadline order before its (planning) deadline — a
  schedulability test, so a switch is paid only when some deadline needs it (lazy switching)
  and never too late for one. Otherwise the earliest-deadline model runs next. Prefill and
  decode share this rule: a new request is one whose deadline is its TTFT, so same-model
  prompts that wait are prefilled together in one visit (grouped), first come first served
  across models as far as deadlines allow.
- ``request``: a model serves until its queue drains, then the oldest waiting request's model
  (request-level scaling: ServerlessLLM, Ollama).
- ``fcfs``: the model of the oldest unfinished request, switching whenever it changes.

``prefetch_hint`` names the model a policy expects to run after the current one (the engine
and the simulator start copying its weights while the current one runs). Policies read the
scheduler's integer queues and never touch a tensor; the simulator drives the same objects
with simulated time.
"""

from __future__ import annotations

import weakref

from gpupool.scheduler.slo import SLO, CostModel

HEADROOM = 0.5  # quotas plan for half the TBT: prefill steps and variance eat the rest
SWITCH_AMORTISE = 2.0  # a quota is at least this many switch times
MARGIN = 0.25  # planning deadlines are this share of the SLO (TTFT or TBT) early


def _oldest(seqs):
    return min(seqs, key=lambda s: s.arrival_time, default=None)


def models_with_work(sched) -> list[str]:
    return [m for m in sched.waiting if sched.waiting[m] or sched.running[m]]


class Policy:
    """``cost`` (step and switch times, measured) and the SLOs are shared by every policy:
    the scheduler reads them to size a step's prefill chunk (``slo(model).tbt_ms``)."""

    name = "base"
    current: str | None = None  # the model the policy last chose (for policies that stay)

    def __init__(self, cost: CostModel | None = None, slos: dict[str, SLO] | None = None,
                 default_slo: SLO | None = None):
        self.cost = cost or CostModel()
        self.slos = slos if slos is not None else {}
        self.default_slo = default_slo or SLO()

    def slo(self, model: str) -> SLO:
        return self.slos.get(model, self.default_slo)

    def set_slo(self, model: str, slo: SLO) -> None:
        """A model's latency objectives."""
        self.slos[model] = slo

    def pick(self, sched, now: float) -> str | None:
        raise NotImplementedError

    def prefetch_hint(self, sched, now: float) -> str | None:
        """The model expected to run after the current one (None: no guess)."""
        return None

    def forget(self, model: str) -> None:
        """The model was removed."""
        if self.current == model:
            self.current = None


class FcfsPolicy(Policy):
    name = "fcfs"

    @staticmethod
    def _heads(sched):
        return [s for m in sched.waiting
                for s in (sched.running[m][:1] + list(sched.waiting[m])[:1])]

    def pick(self, sched, now):
        head = _oldest(self._heads(sched))
        self.current = head.model if head else None
        return self.current

    def prefetch_hint(self, sched, now):
        head = _oldest([s for s in self._heads(sched) if s.model != self.current])
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

    def prefetch_hint(self, sched, now):
        """The model it will pick when the current one drains."""
        head = _oldest([s for m in models_with_work(sched) if m != self.current
                        for s in list(sched.waiting[m])[:1]])
        return head.model if head else None


class TokenPolicy(Policy):
    name = "token"

    def __init__(self, cost: CostModel | None = None, slos: dict[str, SLO] | None = None,
                 default_slo: SLO | None = None):
        super().__init__(cost, slos, default_slo)
        self.quota_end = 0.0
        self.first_token: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._order: list[str] = []

    def seq_deadline(self, seq, slo: SLO, now: float) -> float:
        """When the sequence's next token is due (seconds), less the planning margin. A
        resumed sequence counts only the tokens made since it arrived here."""
        n = len(seq.output_token_ids) - seq.num_delivered
        if n == 0:
            return seq.arrival_time + slo.ttft_ms * (1 - MARGIN) / 1000.0
        t0 = self.first_token.get(seq)
        if t0 is None:  # first seen with a token now: it came during the last step
            t0 = self.first_token[seq] = min(now, slo.token_deadline(seq.arrival_time, 0))
        return min(t0 + (n - MARGIN) * slo.tbt_ms / 1000.0,
                   slo.token_deadline(seq.arrival_time, n) - MARGIN * slo.tbt_ms / 1000.0)

    def deadline(self, sched, model: str, now: float = 0.0) -> float:
        """The earliest planning deadline among the model's unfinished requests."""
        slo = self.slo(model)
        seqs = list(sched.running[model]) + list(sched.waiting[model])
        return min(self.seq_deadline(s, slo, now) for s in seqs)

    def lead(self, busy: list[str]) -> float:
        """How far ahead of its deadlines a model should be when it yields the device: one
        round of the busy models, ``R = sum(switch) / (1 - sum(step / TBT))`` — what each
        model needs to keep pace (one step per TBT) plus the switches of a round."""
        need = sum(self.cost.step(m) / (self.slo(m).tbt_ms / 1000.0) for m in busy)
        switch = sum(self.cost.swap(m) for m in busy) if len(busy) > 1 else 0.0
        return switch / max(1.0 - need, 0.1)

    def quota(self, model: str, busy: list[str]) -> float:
        """The least time a model keeps the device once switched in."""
        alpha = self.cost.step(model) / (HEADROOM * self.slo(model).tbt_ms / 1000.0)
        return max(alpha * self.lead(busy), SWITCH_AMORTISE * self.cost.swap(model))

    def _can_stay(self, order: list[str], deadlines: dict, busy: list[str], now: float) -> bool:
        """Whether the current model may run another quota and every other model still be
        switched in and reach its first step before its deadline, in deadline order."""
        t = now + self.quota(self.current, busy)
        for m in order:
            if m == self.current:
                continue
            if t + self.cost.swap(m) + self.cost.step(m) > deadlines[m]:
                return False
            t += self.cost.swap(m) + self.quota(m, busy)
        return True

    def pick(self, sched, now):
        busy = models_with_work(sched)
        if not busy:
            return None
        deadlines = {m: self.deadline(sched, m, now) for m in busy}  # also notes first tokens
        self._order = sorted(busy, key=deadlines.get)
        current = self.current if self.current in busy else None
        if current is not None and now < self.quota_end:
            return current
        lead = self.lead(busy)
        due = [m for m in self._order  # models that need the device within a round
               if deadlines[m] < now + lead + self.cost.swap(m) and m != current]
        if current is None:
            choice = self._order[0]
        elif not due:
            choice = current  # nobody else needs the device yet: no switch to pay
        elif deadlines[current] >= now + lead or not self._can_stay(
                self._order, deadlines, busy, now):
            choice = due[0]  # current is a round ahead, or staying would make others late
        else:
            choice = current
        if choice != self.current:
            self.quota_end = now + self.quota(choice, busy)
        self.current = choice
        return choice

    def prefetch_hint(self, sched, now):
        return next((m for m in self._order if m != self.current), None)


POLICIES = {"token": TokenPolicy, "request": RequestPolicy, "fcfs": FcfsPolicy}


def make_policy(name: str, cost: CostModel | None = None, slos=None,
                default_slo: SLO | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {name!r}")
    return POLICIES[name](cost, slos, default_slo)
