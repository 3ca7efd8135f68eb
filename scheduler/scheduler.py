"""Continuous batching with chunked prefill and preemption by recompute.

Integers only: the scheduler decides which sequences run this step and how many of their
tokens, allocates KV pages, and preempts when pages run out. It never touches a tensor.

Each step serves one model, chosen by a :mod:`policy <gpupool.scheduler.policy>`; within it:
  1. running sequences, oldest first: 1 token each when decoding, a chunk when prefilling;
  2. waiting sequences, oldest first, while the token budget, the sequence cap and free
     pages allow.
When pages run out, the KV of other models' running sequences (models that do not hold the
device this step, newest request first) is swapped out to host pages first — their batch's
turn has ended, and they resume token-exact when their model runs again; only then is the
newest running sequence of the model itself preempted. A preempted sequence's pages go to
host pages, or with none free it is recomputed later from its prompt + output so far.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from gpupool.pool.kv import PagePool
from gpupool.scheduler.policy import POLICIES, FcfsPolicy, Policy
from gpupool.scheduler.request import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits."""

    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 1024  # tokens computed in one step (prefill chunk budget)
    policy: str = "token"  # which model runs each step: token | request | fcfs
    ttft_ms: float = 2000.0  # default SLO: time to first token
    tbt_ms: float = 200.0  # default SLO: time between tokens

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        return self.seq.num_computed_tokens >= self.seq.num_prompt_tokens and (
            self.num_new_tokens == 1
        )

    @property
    def samples(self) -> bool:
        """Whether this step ends the sequence's known tokens, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: a model and its batch (decode rows first, then prefill chunks)."""

    model: str | None
    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...]
    swap_out: tuple[tuple[int, int], ...] = ()  # (device page, host page): copy before the step
    swap_in: tuple[tuple[int, int], ...] = ()  # (device page, host page): copy before the step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PagePool,
                 host_pages: PagePool | None = None, policy: Policy | None = None):
        """``host_pages``: where preempted sequences' KV goes (None: always recompute);
        ``policy`` picks each step's model (default FCFS)."""
        self.config = config
        self.policy = policy or FcfsPolicy()
        self.pages = pages
        self.host_pages = host_pages
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self.block_tokens: dict[str, int] = {}
        self.max_adapters: dict[str, int] = {}
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: dict[str, list[Sequence]] = {}

    def add_model(self, model: str, block_tokens: int, max_adapters: int = 1 << 30) -> None:
        """``max_adapters``: distinct adapters one step may hold (the device slots)."""
        self.block_tokens[model] = block_tokens
        self.max_adapters[model] = max_adapters
        self.waiting.setdefault(model, deque())
        self.running.setdefault(model, [])

    def remove_model(self, model: str) -> None:
        """Forget a model with no unfinished sequences."""
        assert not self.num_unfinished(model)
        for table in (self.block_tokens, self.max_adapters, self.waiting, self.running):
            table.pop(model)
        self.policy.forget(model)

    def add_request(self, seq: Sequence) -> None:
        self.waiting[seq.model].append(seq)

    def has_work(self) -> bool:
        return any(self.waiting.values()) or any(self.running.values())

    def num_unfinished(self, model: str | None = None) -> int:
        models = [model] if model else list(self.waiting)
        return sum(len(self.waiting[m]) + len(self.running[m]) for m in models)

    def _pages_needed(self, seq: Sequence, num_new: int) -> int:
        bt = self.block_tokens[seq.model]
        return -(-(seq.num_computed_tokens + num_new) // bt) - len(seq.pages)

    def _preempt(self, seq: Sequence, swap: bool = True) -> None:
        """Swap the sequence's KV out to host pages, or (no room there, or ``swap`` False)
        drop it to recompute."""
        host = self.host_pages.allocate(len(seq.pages)) if self.host_pages and swap else None
        if host is not None and seq.pages:
            self._swap_out.extend(zip(seq.pages, host))
            seq.host_pages = host
        else:
            seq.num_computed_tokens = 0
        self.pages.free(seq.pages)
        seq.pages = []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.running[seq.model].remove(seq)
        self.waiting[seq.model].appendleft(seq)

    def _evict_others(self, model: str, need: int, preempted: list[Sequence],
                      swap: bool = True) -> None:
        """Preempt other models' running sequences, newest first, until ``need`` pages are
        free or none is left. Their KV goes to host pages when there is room and ``swap``
        (False when the step swaps a sequence in: a host page a swap-in frees must not be
        overwritten by a swap-out of the same step, so they recompute instead)."""
        others = sorted((q for m, run in self.running.items() if m != model for q in run),
                        key=lambda q: q.arrival_time)
        while others and not self.pages.can_allocate(need):
            victim = others.pop()
            self._preempt(victim, swap)
            preempted.append(victim)

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """A step's batch. Swap-outs (preemption) and swap-ins (waiting sequences resuming)
        never share a step: a page freed by one could otherwise be overwritten before the
        other's copy reads it."""
        model = self.policy.pick(self, time.monotonic() if now is None else now)
        if model is None:
            return SchedulerOutput(None, (), ())
        self._swap_out, self._swap_in = [], []
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        running = self.running[model]
        adapters: set[str] = set()
        cap = self.max_adapters[model]

        def fits(seq: Sequence) -> bool:  # a step holds at most `cap` distinct adapters
            return seq.adapter is None or seq.adapter in adapters or len(adapters) < cap

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if not fits(seq):  # deferred to a later step; keeps its pages
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._pages_needed(seq, num_new)
            self._evict_others(model, need, preempted)
            while not self.pages.can_allocate(need) and running[-1] is not seq:
                victim = running[-1]
                self._preempt(victim)
                preempted.append(victim)
            if not self.pages.can_allocate(need):  # seq is the newest: preempt it too
                self._preempt(seq)
                preempted.append(seq)
                break
            seq.pages.extend(self.pages.allocate(need))
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if seq.adapter:
                adapters.add(seq.adapter)
            i += 1
        waiting = self.waiting[model]
        j = 0
        own_preempted = any(q.model == model for q in preempted)
        while (j < len(waiting) and budget > 0 and len(running) < self.config.max_num_seqs
               and not own_preempted):
            seq = waiting[j]
            if not fits(seq):
                j += 1
                continue
            if seq.host_pages and self._swap_out:  # its swap-in waits for a step without
                break  # swap-outs (the freed pages may be the ones it would copy into)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._pages_needed(seq, num_new)
            # evicted KV recomputes if this step swaps in: no swap-out beside a swap-in
            self._evict_others(model, need, preempted,
                               swap=not (seq.host_pages or self._swap_in))
            if not self.pages.can_allocate(need):
                break
            del waiting[j]
            seq.pages.extend(self.pages.allocate(need))
            if seq.host_pages:  # resume: bring the swapped KV back into the new pages
                self._swap_in.extend(zip(seq.pages, seq.host_pages))
                self.host_pages.free(seq.host_pages)
                seq.host_pages = []
            seq.status = Status.RUNNING
            running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if seq.adapter:
                adapters.add(seq.adapter)
        # decode rows first, then prefill chunks; each part grouped by adapter (SGMV segments)
        scheduled.sort(key=lambda s: (not s.is_decode, s.seq.adapter or ""))
        return SchedulerOutput(model, tuple(scheduled), tuple(preempted),
                               tuple(self._swap_out), tuple(self._swap_in))

    def update_from_output(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens this step computed."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is and free its pages. Safe to call twice."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running[seq.model].remove(seq)
        elif seq in self.waiting[seq.model]:
            self.waiting[seq.model].remove(seq)
        self.pages.free(seq.pages)
        seq.pages = []
        if seq.host_pages:
            self.host_pages.free(seq.host_pages)
            seq.host_pages = []
        seq.status = Status.FINISHED
        seq.finish_reason = reason
