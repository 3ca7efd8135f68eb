"""Continuous batching with chunked prefill and preemption by recompute.

Integers only: the scheduler decides which sequences run this step and how many of their
tokens, allocates KV pages, and preempts when pages run out. It never touches a tensor.

Each step serves one model, chosen by a :mod:`policy <gpupool.scheduler.policy>`; within it:
  1. running sequences, oldest first: 1 token each when decoding, a chunk when prefilling;
  2. waiting sequences, oldest first, while the token budget, the sequence cap and free
     pages allow. While prompts prefill and other tenants' prompts wait, the running prompts
     get only their tenants' share of the step's budget (an equal split between those
     tenants and the waiting ones), so another tenant's short prompt is admitted in the next
     step instead of waiting behind a long one.
When pages run out, the KV of other models' running sequences (models that do not hold the
device this step, newest request first) is swapped out to host pages first — their batch's
turn has ended, and they resume token-exact when their model runs again; only then is the
newest running sequence of the model itself preempted. A preempted sequence's pages go to
host pages, or with none free it is recomputed later from its prompt + output so far.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from gpupool.pool.pages import PagePool, page_key
from gpupool.scheduler.policy import POLICIES, FcfsPolicy, Policy
from gpupool.scheduler.request import Sequence, Status

MIN_PREFILL_CHUNK = 16  # a step that decodes still advances prompts by at least this
TBT_SHARE = 0.5  # of the TBT SLO a decoding step may spend on prompt tokens


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits."""

    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 1024  # tokens computed in one step (prefill chunk budget)
    policy: str = "token"  # which model runs each step: token | request | fcfs
    ttft_ms: float = 2000.0  # default SLO: time to first token
    tbt_ms: float = 200.0  # default SLO: time between tokens
    # prompt tokens a step that also decodes may compute (None: sized from the TBT SLO and
    # the measured cost of a token), so running streams never stall behind a long prompt;
    # a short prompt not started yet is taken whole if the step stays within twice this
    max_prefill_tokens_while_decoding: int | None = None
    # full KV pages stay indexed by their prefix (model, adapter, salt, tokens) and a new
    # request reuses the longest cached chain of its prompt
    enable_prefix_caching: bool = True
    # running prompts leave a share of the step's budget to other tenants' waiting prompts
    # (False: they take it all, as before; benchmarks/bench_fairness.py compares the two)
    fair_prefill: bool = True
    # a waiting request whose adapter is off the device lets requests whose adapters are on
    # it (or already in the step) go first for at most this long after its arrival, then
    # keeps its place (0: plain fair order, neither the preference nor its bound)
    adapter_wait_ms: float = 500.0

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and cap < 1:
            raise ValueError("max_prefill_tokens_while_decoding must be >= 1 (or unset)")
        if self.adapter_wait_ms < 0:
            raise ValueError("adapter_wait_ms must be >= 0")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")

    @property
    def adapter_wait_s(self) -> float:
        return self.adapter_wait_ms / 1000.0


@dataclass
class _Step:
    """What one ``schedule`` call has used so far."""

    budget: int  # tokens left in the step
    max_adapters: int  # distinct adapters the step may hold
    max_tenant_adapters: int = 1 << 30  # of them, first brought in by one tenant
    prefill_left: int = 1 << 30  # prompt tokens left (capped when the step also decodes)
    prefill_cap: int = 0  # the cap, when the step decodes (a short prompt may overrun it)
    running_prefill_left: int = 1 << 30  # prompt tokens left to running prompts (fair share)
    scheduled: list = field(default_factory=list)
    preempted: list = field(default_factory=list)
    adapters: set = field(default_factory=set)
    tenant_adapters: Counter = field(default_factory=Counter)  # tenant -> adapters it brought

    def fits(self, seq) -> bool:
        """A step holds at most ``max_adapters`` distinct adapters, ``max_tenant_adapters``
        of them brought in by one tenant (an adapter already in the step is free)."""
        return (seq.adapter is None or seq.adapter in self.adapters
                or (len(self.adapters) < self.max_adapters
                    and self.tenant_adapters[seq.tenant] < self.max_tenant_adapters))


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
        # per model: the widest sliding window where every layer has one (0: some layer sees
        # the whole context): a sequence's KV blocks wholly behind it are released
        self.windows: dict[str, int] = {}
        # per model mixing global and windowed layers: (the windowed layers' tokens a page,
        # their widest window); their KV blocks have pages of their own, released behind it
        self.window_groups: dict[str, tuple[int, int]] = {}
        self.num_released_pages = 0  # pages freed behind windows, in total
        self.max_adapters: dict[str, int] = {}
        # per model: distinct adapters of one tenant a step may hold (its slots' cap)
        self.max_tenant_adapters: dict[str, int] = {}
        # per model: the adapters on the device now (the engine sets it before each step;
        # absent: unknown, no preference)
        self.resident_adapters: dict[str, object] = {}
        # per model: adapter -> (the pool's key, pages, cost) of its device copy, which
        # lives in the KV pool (adapters/paged.py; the engine sets it): a request whose
        # adapter has no pages takes them at admission, with its KV pages
        self.adapter_pages: dict[str, object] = {}
        self._step_pins: set = set()  # adapters pinned by this schedule's admissions
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: dict[str, list[Sequence]] = {}
        self._step = 0
        self.num_preemptions = 0  # sequences preempted (swapped out or dropped), in total
        self.preemptions_by_model: Counter = Counter()
        self.rope_switch: dict[str, int | None] = {}
        # prefix cache, per model: prompt tokens looked up, and found cached
        self.cache_queries: Counter[str] = Counter()
        self.cache_hits: Counter[str] = Counter()

    def add_model(self, model: str, block_tokens: int, max_adapters: int = 1 << 30,
                  max_tenant_adapters: int = 1 << 30, rope_switch: int | None = None,
                  window: int = 0, window_group: tuple[int, int] | None = None) -> None:
        """``max_adapters``: distinct adapters one step may hold (the device slots);
        ``max_tenant_adapters``: of them, brought in by one tenant (its cap of slots);
        ``rope_switch``: LongRoPE's threshold (a sequence longer than this computes every
        position with the long factors: one that grows past it is recomputed, as
        transformers recomputes its cache); ``window``: where every layer of the model has
        a sliding window, the widest (a token sees keys ``window - 1`` behind it at most),
        else 0; ``window_group``: where windowed layers mix with global ones, their KV
        group's (tokens a page, widest window); ``block_tokens`` is then the global layers'
        (a multiple of the windowed layers' tokens a page, or one of them)."""
        self.rope_switch[model] = rope_switch
        self.block_tokens[model] = block_tokens
        self.windows[model] = window
        if window_group is not None:
            self.window_groups[model] = window_group
        self.max_adapters[model] = max_adapters
        self.max_tenant_adapters[model] = max_tenant_adapters
        self.waiting.setdefault(model, deque())
        self.running.setdefault(model, [])

    def remove_model(self, model: str) -> None:
        """Forget a model with no unfinished sequences."""
        assert not self.num_unfinished(model)
        for table in (self.block_tokens, self.max_adapters, self.max_tenant_adapters,
                      self.waiting, self.running, self.rope_switch, self.windows):
            table.pop(model)
        self.resident_adapters.pop(model, None)
        self.adapter_pages.pop(model, None)
        self.window_groups.pop(model, None)
        self.policy.forget(model)

    def enqueue(self, seq: Sequence) -> None:
        self.waiting[seq.model].append(seq)

    def has_work(self) -> bool:
        return any(self.waiting.values()) or any(self.running.values())

    def num_unfinished(self, model: str | None = None) -> int:
        models = [model] if model else list(self.waiting)
        return sum(len(self.waiting[m]) + len(self.running[m]) for m in models)

    def _pages_needed(self, seq: Sequence, num_new: int) -> int:
        """New pages the sequence's next ``num_new`` tokens need (in both KV groups of a model
        that has two)."""
        return sum(self._group_needs(seq, num_new))

    def _group_needs(self, seq: Sequence, num_new: int) -> tuple[int, int]:
        """(pages, window pages) :meth:`_pages_needed` counts."""
        end = seq.num_computed_tokens + num_new
        need = -(-end // self.block_tokens[seq.model]) - seq.num_dropped_pages - len(seq.pages)
        group = self.window_groups.get(seq.model)
        if group is None:
            return need, 0
        return need, (-(-end // group[0]) - seq.num_dropped_window_pages
                      - len(seq.window_pages))

    def _grow(self, seq: Sequence, num_new: int) -> None:
        """Give the sequence the pages its next ``num_new`` tokens need (the caller checked
        the pool has them: ``can_allocate``)."""
        need, window = self._group_needs(seq, num_new)
        pages = self.pages.allocate(need + window)
        seq.pages.extend(pages[:need])
        seq.window_pages.extend(pages[need:])

    def peak_pages(self, model: str, num_tokens: int) -> int:
        """The most KV pages a sequence of ``num_tokens`` tokens holds at once: all its
        blocks, or with every layer windowed the window's blocks plus one step's tokens
        (a step computes at most ``max_num_batched_tokens`` of one sequence); a model
        mixing global and windowed layers, its global layers' blocks and its windowed
        layers' window."""
        def held(bt: int, window: int) -> int:
            pages = -(-num_tokens // bt)
            if window:
                pages = min(pages, (window - 1 + self.config.max_num_batched_tokens) // bt + 2)
            return pages

        pages = held(self.block_tokens[model], self.windows.get(model, 0))
        group = self.window_groups.get(model)
        return pages + (held(*group) if group else 0)

    def max_tokens(self, model: str, num_pages: int, limit: int) -> int:
        """The longest sequence (at most ``limit`` tokens) whose :meth:`peak_pages` fit in
        ``num_pages``."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak_pages(model, mid) <= num_pages:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def dead_blocks(self, seq: Sequence, first_query: int) -> int:
        """Blocks a sequence's queries from position ``first_query`` on never read: those
        wholly behind every layer's window (0 where some layer sees everything)."""
        window = self.windows.get(seq.model, 0)
        if not window:
            return 0
        return max(0, first_query - window + 1) // self.block_tokens[seq.model]

    def dead_window_blocks(self, seq: Sequence, first_query: int) -> int:
        """:meth:`dead_blocks` of the windowed layers' KV group (0: the model has none)."""
        group = self.window_groups.get(seq.model)
        if group is None:
            return 0
        return max(0, first_query - group[1] + 1) // group[0]

    def release_behind_window(self, seq: Sequence) -> None:
        """Free the sequence's pages that no query of it will read again (behind every
        layer's window of its next token, or behind the windowed layers' window in their
        own group); an indexed one stays cached for other prompts."""
        n = seq.num_computed_tokens
        seq.num_dropped_pages += self._release(
            seq.pages, self.dead_blocks(seq, n) - seq.num_dropped_pages)
        seq.num_dropped_window_pages += self._release(
            seq.window_pages, self.dead_window_blocks(seq, n) - seq.num_dropped_window_pages)

    def _release(self, pages: list[int], dead: int) -> int:
        """Free the first ``dead`` of a sequence's ``pages`` (a group's page list) and drop
        them from it; how many (none where ``dead`` < 1)."""
        if dead <= 0:
            return 0
        self.pages.free(pages[:dead])
        del pages[:dead]
        self.num_released_pages += dead
        return dead

    def _preempt(self, seq: Sequence, swap: bool = True) -> None:
        """Swap the sequence's KV out to host pages, or (no room there, or ``swap`` False)
        drop it to recompute."""
        switch = self.rope_switch.get(seq.model)
        if switch is not None and not seq.long_rope and seq.num_tokens > switch:
            swap = False  # past LongRoPE's switch: its KV is recomputed with the long factors
        held = seq.pages + seq.window_pages  # (a model's windowed layers' group after)
        host = self.host_pages.allocate(len(held)) if self.host_pages and swap else None
        swapped = host is not None and bool(held)
        if swapped:
            self._swap_out.extend(zip(held, host))
            # (its released blocks stay released)
            seq.host_pages, seq.host_window_pages = host[:len(seq.pages)], host[len(seq.pages):]
        self._give_back(seq)  # indexed pages stay cached: a recompute may hit them
        if not swapped:
            seq.num_computed_tokens = seq.num_dropped_pages = seq.num_dropped_window_pages = 0
        seq.pages, seq.window_pages = [], []
        seq.num_indexed_pages = seq.num_indexed_window_pages = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_model[seq.model] += 1
        self.running[seq.model].remove(seq)
        self.waiting[seq.model].appendleft(seq)
        if seq.adapter:
            self._pin_running()

    def _give_back(self, seq: Sequence) -> None:
        """Free the sequence's pages (the caller forgets them) its last blocks first, and
        touch its blocks released behind a window that are still cached, each in its place:
        the pool then evicts a cached prefix from its tail (what is left still serves a
        shorter hit) rather than from its head, which would leave no hit at all; and a
        window's blocks before a hit's end, released early, stay as long as the blocks they
        follow."""
        placed = [(i * self.block_tokens[seq.model], p)
                  for i, p in enumerate(seq.pages, seq.num_dropped_pages)]
        group = self.window_groups.get(seq.model)
        if group:
            placed += [(j * group[0], p)
                       for j, p in enumerate(seq.window_pages, seq.num_dropped_window_pages)]
        released = self._released_cached(seq)
        self.pages.share([p for _, p in released])  # held a moment: touched when freed
        # (a stable sort: of one first token, a released block after a held one)
        self.pages.free([p for _, p in sorted(placed + released, key=lambda x: -x[0])])

    def _released_cached(self, seq: Sequence) -> list[tuple[int, int]]:
        """(first token, page) of the sequence's blocks released behind a window that the
        prefix index still holds (as it indexed them)."""
        out = []
        for keys, dropped, bt in (
                (seq.page_keys, seq.num_dropped_pages, self.block_tokens[seq.model]),
                (seq.window_page_keys, seq.num_dropped_window_pages,
                 self.window_groups.get(seq.model, (1,))[0])):
            for i, key in enumerate(keys[:dropped]):
                page = self.pages.lookup([key])
                if page:
                    out.append((i * bt, page[0]))
        return out

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

    def prefill_cap(self, model: str, decode_rows: int = 1) -> int:
        """Most prompt tokens a step that also decodes may compute: a running stream waits one
        step for its next token, so that step should fit the model's TBT SLO. Fixed by
        ``max_prefill_tokens_while_decoding``; else the time of ``TBT_SHARE`` of the TBT, or
        of this step's ``decode_rows`` decode rows when they alone take longer (a TBT this
        device cannot meet: streams then still get at least half of it), over the measured
        cost of a prompt token. The whole step budget until a cost is known."""
        budget = self.config.max_num_batched_tokens
        if self.config.max_prefill_tokens_while_decoding is not None:
            return min(budget, self.config.max_prefill_tokens_while_decoding)
        cost = self.policy.cost
        per_token = cost.token(model)
        if per_token is None:
            return budget
        seconds = max(TBT_SHARE * self.policy.slo(model).tbt_ms / 1000.0,
                      cost.decode(model, decode_rows) or 0.0)
        return max(MIN_PREFILL_CHUNK, min(budget, int(seconds / per_token)))

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """A step's batch. Swap-outs (preemption) and swap-ins (waiting sequences resuming)
        never share a step: a page freed by one could otherwise be overwritten before the
        other's copy reads it."""
        now = time.monotonic() if now is None else now
        model = self.policy.pick(self, now)
        if model is None:
            return SchedulerOutput(None, (), ())
        self._swap_out, self._swap_in = [], []
        self._step += 1
        self._step_pins = set()
        self._pin_running()
        step = _Step(self.config.max_num_batched_tokens, self.max_adapters[model],
                     self.max_tenant_adapters[model])
        decoding = sum(q.num_tokens - q.num_computed_tokens == 1 for q in self.running[model])
        if decoding:
            step.prefill_cap = min(step.budget, self.prefill_cap(model, decoding))
            step.prefill_left = step.prefill_cap
        fair = self._preempt_for_fairness(model)
        self._recompute_past_rope_switch(model, step)
        self._share_prefill(model, step)
        self._schedule_running(model, step)
        if not any(q.model == model for q in step.preempted):  # no room freed by own preemption
            self._admit_waiting(model, step, skip=fair, now=now)
        step.preempted.extend(fair)
        # decode rows first, then prefill chunks; each part grouped by adapter (SGMV segments)
        step.scheduled.sort(key=lambda x: (not x.is_decode, x.seq.adapter or ""))
        for x in step.scheduled:
            if x.seq.first_scheduled_time is None:  # its queue time ends (vLLM's metric)
                x.seq.first_scheduled_time = now
        self._step_pins = set()  # the admitted run now: pinned as running from here on
        return SchedulerOutput(model, tuple(step.scheduled), tuple(step.preempted),
                               tuple(self._swap_out), tuple(self._swap_in))

    def _recompute_past_rope_switch(self, model: str, step: _Step) -> None:
        """Running sequences about to grow past the model's LongRoPE switch with KV of the
        short factors: dropped to be recomputed with the long ones."""
        switch = self.rope_switch.get(model)
        if switch is None:
            return
        for seq in [q for q in self.running[model] if not q.long_rope
                    and q.num_tokens > switch]:
            self._preempt(seq, swap=False)
            step.preempted.append(seq)

    def _rope_mode(self, seq: Sequence) -> None:
        """A sequence starting from nothing past the LongRoPE switch: long factors, and a
        prefix-cache chain of their own (the short factors' KV differs)."""
        switch = self.rope_switch.get(seq.model)
        if switch is not None and not seq.long_rope and seq.num_tokens > switch:
            seq.long_rope = True
            if seq.cache_root is not None:
                seq.cache_root = hashlib.sha256(seq.cache_root + b"longrope").digest()
                seq.page_keys, seq.window_page_keys = [], []

    def _share_prefill(self, model: str, step: _Step) -> None:
        """While prompts prefill and prompts of other tenants wait, the running prompts get
        their tenants' share of the step's budget, the rest is left to the waiting ones."""
        prefilling = {q.tenant for q in self.running[model]
                      if q.num_tokens - q.num_computed_tokens > 1}
        if not prefilling or not self.config.fair_prefill:
            return
        others = {q.tenant for q in self.waiting[model] if q.tenant not in prefilling}
        if others:
            share = step.budget * len(prefilling) // (len(prefilling) + len(others))
            step.running_prefill_left = max(MIN_PREFILL_CHUNK, share)

    def _num_new(self, seq: Sequence, step: _Step) -> int:
        """Tokens the sequence computes this step: 1 to decode, a chunk of its prompt (or of
        the tokens to recompute) within both budgets; 0 when no budget is left. A prompt not
        started yet is taken whole when the step's prompt tokens stay within twice the cap:
        splitting a short prompt costs its first token a whole step and saves little."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining == 1:
            return 1 if step.budget > 0 else 0
        if (seq.num_computed_tokens == 0 and step.prefill_left > 0
                and remaining <= step.prefill_left + step.prefill_cap):
            return min(remaining, step.budget)  # a short prompt whole: one step, not two
        return max(0, min(remaining, step.budget, step.prefill_left))

    def _take(self, seq: Sequence, num_new: int, step: _Step) -> None:
        step.scheduled.append(ScheduledSeq(seq, num_new))
        step.budget -= num_new
        if seq.num_tokens - seq.num_computed_tokens > 1:
            step.prefill_left -= num_new
        if seq.adapter and seq.adapter not in step.adapters:
            step.adapters.add(seq.adapter)
            step.tenant_adapters[seq.tenant] += 1
        seq.last_step = self._step

    def _victim(self, model: str, step: _Step, spare: Sequence) -> Sequence | None:
        """The newest running sequence of ``model`` not in this step's batch, nor ``spare``."""
        taken = {id(x.seq) for x in step.scheduled}
        return next((q for q in reversed(self.running[model])
                     if id(q) not in taken and q is not spare), None)

    def _schedule_running(self, model: str, step: _Step) -> None:
        """Running sequences, least recently run first (so one deferred for want of an
        adapter slot goes first next time), each with the pages its tokens need; when pages
        run out other models' sequences are evicted, then this model's newest."""
        for seq in sorted(self.running[model], key=lambda q: q.last_step):
            if step.budget <= 0:
                break
            if seq.status is not Status.RUNNING or not step.fits(seq):
                continue  # preempted above as a victim, or deferred: keeps its pages
            num_new = self._num_new(seq, step)
            prefilling = seq.num_tokens - seq.num_computed_tokens > 1
            if prefilling:
                num_new = min(num_new, step.running_prefill_left)
            if num_new == 0:
                continue
            need = self._pages_needed(seq, num_new)
            key, extra, cost = self._adapter_need(seq)
            self._evict_others(model, need + extra, step.preempted)
            while not self.pages.can_allocate(need + extra):
                victim = self._victim(model, step, seq)
                if victim is None:
                    break
                self._preempt(victim)
                step.preempted.append(victim)
            if not self.pages.can_allocate(need + extra):  # nothing else to evict: it too
                self._preempt(seq)
                step.preempted.append(seq)
                break
            self._take_adapter_pages(key, extra, cost)
            self._grow(seq, num_new)
            self._take(seq, num_new, step)
            if prefilling:
                step.running_prefill_left -= num_new

    def _admit_waiting(self, model: str, step: _Step, skip: list[Sequence],
                       now: float) -> None:
        """Waiting sequences in fair order (those whose adapter is warm first, see
        :meth:`_warm_first`) while budgets, the sequence cap and pages allow; ``skip``:
        preempted for fairness this step (never re-admitted at once)."""
        running = self.running[model]
        wait = self.config.adapter_wait_s
        # adapter sequences that arrived from then on wait (see _overdue); found before the
        # loop too, so none that comes earlier in the fair order passes an overdue one
        cutoff = min((q.arrival_time + wait for q in self.waiting[model]
                      if self._overdue(q, step, now)), default=float("inf"))
        for seq in self._warm_first(model, self._fair_order(model), step, now):
            if step.budget <= 0 or len(running) >= self.config.max_num_seqs:
                break
            if any(seq is q for q in skip) or (seq.adapter is not None
                                                and seq.arrival_time >= cutoff):
                continue
            if not step.fits(seq):
                if self._overdue(seq, step, now):
                    cutoff = min(cutoff, seq.arrival_time + wait)
                continue
            if seq.host_pages and self._swap_out:  # its swap-in waits for a step without
                break  # swap-outs (the freed pages may be the ones it would copy into)
            hit = self._take_cached_prefix(seq)
            num_new = self._num_new(seq, step)
            need = self._pages_needed(seq, num_new)
            key, extra, cost = self._adapter_need(seq)
            # evicted KV recomputes if this step swaps in: no swap-out beside a swap-in
            if num_new:
                self._evict_others(model, need + extra, step.preempted,
                                   swap=not (seq.host_pages or self._swap_in))
            if num_new == 0 or not self.pages.can_allocate(need + extra):
                self._unpin_refused(key)
                if hit:  # not admitted: the prefix goes back to the cache
                    self._give_back(seq)
                    seq.pages, seq.num_computed_tokens, seq.num_indexed_pages = [], 0, 0
                    seq.window_pages, seq.num_indexed_window_pages = [], 0
                    seq.num_dropped_pages = seq.num_dropped_window_pages = 0
                if num_new == 0:
                    continue
                break
            if hit and seq.num_preemptions == 0:
                seq.num_cached_tokens = hit
            if seq.cache_root is not None and not seq.host_pages:
                self.cache_queries[model] += seq.num_tokens
                self.cache_hits[model] += hit
            self.waiting[model].remove(seq)
            self._take_adapter_pages(key, extra, cost)
            self._grow(seq, num_new)
            if seq.host_pages:  # resume: bring the swapped KV back into the new pages
                self._swap_in.extend(zip(seq.pages, seq.host_pages))
                self._swap_in.extend(zip(seq.window_pages, seq.host_window_pages))
                self.host_pages.free(seq.host_pages + seq.host_window_pages)
                seq.host_pages, seq.host_window_pages = [], []
            seq.status = Status.RUNNING
            running.append(seq)
            self._take(seq, num_new, step)

    def _pin_running(self) -> None:
        """The adapters of running sequences, and of the one being admitted, are never
        evicted; the others are idle."""
        self.pages.set_pinned({(q.model, q.adapter) for run in self.running.values()
                               for q in run if q.adapter} | self._step_pins)

    def _adapter_need(self, seq: Sequence) -> tuple:
        """(the pool's key, pages to take, cost) for ``seq``'s adapter's device copy: none
        where it has them already (then pinned now, so the pages counted free next are not
        its own), no adapter, or a model without adapters."""
        request = self.adapter_pages.get(seq.model)
        if seq.adapter is None or request is None:
            return None, 0, 0.0
        key, num_pages, cost = request(seq.adapter)
        if self.pages.adapter_pages(key) is not None:
            self._step_pins.add(key)  # kept through preemptions that re-pin (_pin_running)
            self.pages.pin(key)
            return key, 0, cost
        return key, num_pages, cost

    def _unpin_refused(self, key) -> None:
        """The sequence pinning ``key`` was not taken: its adapter is idle again, unless a
        running sequence uses it."""
        if key is not None and key in self._step_pins:
            self._step_pins.discard(key)
            self._pin_running()

    def _take_adapter_pages(self, key, extra: int, cost: float) -> None:
        """The pages of the adapter of a sequence taken into the step, where it has none
        (the caller checked they are there: ``can_allocate``); pinned."""
        if extra:
            self.pages.allocate_adapter(key, extra, cost)
            self._step_pins.add(key)

    # ---- prefix cache -------------------------------------------------------------------
    def _page_key(self, seq: Sequence, i: int) -> bytes:
        """The chain key of the sequence's page ``i`` (its tokens must be known)."""
        return self._chain_key(seq, seq.page_keys, seq.cache_root,
                               self.block_tokens[seq.model], i)

    def _window_page_key(self, seq: Sequence, i: int) -> bytes:
        """:meth:`_page_key` of the windowed layers' group: a chain of its own (its blocks'
        size, its root: another group's page of the same tokens holds other layers)."""
        root = (b"" if seq.window_page_keys  # (the root: only for the first key)
                else hashlib.sha256(seq.cache_root + b"window layers").digest())
        return self._chain_key(seq, seq.window_page_keys, root,
                               self.window_groups[seq.model][0], i)

    @staticmethod
    def _chain_key(seq: Sequence, keys: list[bytes], root: bytes, bt: int, i: int) -> bytes:
        while len(keys) <= i:
            j = len(keys)
            keys.append(page_key(keys[-1] if keys else root,
                                 seq.token_ids(j * bt, (j + 1) * bt)))
        return keys[i]

    def _take_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence starting from nothing: hold the longest cached chain of its full
        pages (never its last token: at least one is computed, to sample from) and skip
        their tokens. Returns the tokens taken."""
        if not seq.pages and not seq.host_pages and not seq.num_computed_tokens:
            self._rope_mode(seq)
        if (seq.cache_root is None or seq.pages or seq.host_pages
                or seq.num_computed_tokens or not self.config.enable_prefix_caching
                or seq.params.prompt_logprobs is not None  # needs every prompt position
                or seq.params.pooling == "mean"):
            return 0
        bt = self.block_tokens[seq.model]
        keys = [self._page_key(seq, i) for i in range((seq.num_tokens - 1) // bt)]
        if self.windows.get(seq.model):
            blocks, dead = self._window_hit(seq, keys)
            hit = self.pages.lookup(keys[dead:blocks])
        else:
            hit = self.pages.lookup(keys)
            blocks, dead = len(hit), 0
        if seq.model in self.window_groups:
            blocks, window_hit = self._mixed_hit(seq, len(hit))
            hit = hit[:blocks]
        if not hit:
            return 0
        self.pages.share(hit)
        seq.pages = list(hit)
        seq.num_dropped_pages = dead
        seq.num_computed_tokens = blocks * bt
        seq.num_indexed_pages = blocks
        if seq.model in self.window_groups:  # the windowed layers' pages the window reaches
            self.pages.share(window_hit)
            seq.window_pages = list(window_hit)
            seq.num_dropped_window_pages = self.dead_window_blocks(seq, blocks * bt)
            seq.num_indexed_window_pages = seq.num_dropped_window_pages + len(window_hit)
        return seq.num_computed_tokens

    def _mixed_hit(self, seq: Sequence, blocks: int) -> tuple[int, list[int]]:
        """(blocks, window pages): of a model mixing global and windowed layers whose first
        ``blocks`` global pages are cached, the most of them a hit can skip, whose tokens
        end where a windowed layers' block ends and whose windowed layers' pages the
        window reaches back into (from the first token it computes) are cached too, and
        those pages."""
        bt, wbt = self.block_tokens[seq.model], self.window_groups[seq.model][0]
        keys = [self._window_page_key(seq, j) for j in range(blocks * bt // wbt)]
        run = [0]  # run[j]: cached windowed layers' blocks just before block j
        for key in keys:
            run.append(run[-1] + 1 if self.pages.lookup([key]) else 0)
        for b in range(blocks, 0, -1):
            end = b * bt
            dead = self.dead_window_blocks(seq, end)
            if end % wbt == 0 and run[end // wbt] >= end // wbt - dead:
                return b, self.pages.lookup(keys[dead : end // wbt])
        return 0, []

    def _window_hit(self, seq: Sequence, keys: list[bytes]) -> tuple[int, int]:
        """(blocks, dead): the longest run of cached blocks a sequence of a model whose
        every layer is windowed can skip: only the blocks its window reaches back into
        from the first token it computes must be cached (``dead`` before them need not)."""
        cached = [self.pages.lookup([k]) != [] for k in keys]
        run = 0  # cached blocks just before block i
        best = (0, 0)
        for i, here in enumerate(cached, 1):
            run = run + 1 if here else 0
            dead = self.dead_blocks(seq, i * self.block_tokens[seq.model])
            if run and i - run <= dead:
                best = (i, dead)
        return best

    def _index_full_pages(self, seq: Sequence) -> None:
        """Put the sequence's newly computed full pages in the prefix index (of both KV
        groups where its model has two)."""
        seq.num_indexed_pages = self._index(
            seq, seq.pages, seq.num_dropped_pages, seq.num_indexed_pages,
            self.block_tokens[seq.model], self._page_key)
        group = self.window_groups.get(seq.model)
        if group is not None:
            seq.num_indexed_window_pages = self._index(
                seq, seq.window_pages, seq.num_dropped_window_pages,
                seq.num_indexed_window_pages, group[0], self._window_page_key)

    def _index(self, seq: Sequence, pages: list[int], first: int, indexed: int, bt: int,
               key) -> int:
        """Register a group's full pages (``pages`` hold its blocks from ``first`` on; blocks
        before ``indexed`` are done; ``key(seq, i)``: block i's chain key); the blocks done
        after."""
        full = min(seq.num_computed_tokens // bt, first + len(pages))
        for i in range(max(indexed, first), full):
            self.pages.register(pages[i - first], key(seq, i), seq.model, seq.adapter)
        return max(indexed, full)

    def _fair_order(self, model: str) -> list[Sequence]:
        """Waiting sequences, tenants interleaved: each one's key is its tenant's running
        sequences plus its place in that tenant's queue (FIFO within a tenant), so a tenant
        with fewer sequences in the batch goes first. One tenant: plain FIFO."""
        counts = Counter(q.tenant for q in self.running[model])
        keyed = []
        for i, seq in enumerate(self.waiting[model]):
            keyed.append((counts[seq.tenant], i, seq))
            counts[seq.tenant] += 1
        return [seq for _, _, seq in sorted(keyed, key=lambda k: k[:2])]

    def _warm_first(self, model: str, order: list[Sequence], step: _Step,
                    now: float) -> list[Sequence]:
        """``order`` with the sequences whose adapter is cold (not on the device, nor in
        the step) after the others, unless they have waited ``adapter_wait_ms`` since
        arrival (then they keep their place: a cold adapter's wait is bounded). Each group
        keeps its fair order. A step then loads fewer adapters, and evicts fewer that
        queued requests need, where the device holds fewer adapters than are queued."""
        resident = self.resident_adapters.get(model)
        wait = self.config.adapter_wait_s
        if resident is None or not wait:
            return order
        running = {q.adapter for q in self.running[model]}

        def cold(seq: Sequence) -> bool:
            return (seq.adapter is not None and seq.adapter not in resident
                    and seq.adapter not in step.adapters and seq.adapter not in running
                    and now - seq.arrival_time < wait)
        return sorted(order, key=cold)

    def _overdue(self, seq: Sequence, step: _Step, now: float) -> bool:
        """Whether ``seq`` has waited ``adapter_wait_ms`` and finds the step's adapters full
        without its own: then no adapter sequence that arrived after it became overdue is
        admitted (base-model ones are: they hold no adapter), so the adapters running drain
        (their requests from before still run) and it gets in: its wait is bounded by
        ``adapter_wait_ms`` plus that drain. ``adapter_wait_ms=0`` turns the bound off with
        the preference (the order before both)."""
        wait = self.config.adapter_wait_s
        return (wait > 0 and seq.adapter is not None and seq.adapter not in step.adapters
                and now - seq.arrival_time >= wait
                and len(step.adapters) >= step.max_adapters)

    def _preempt_for_fairness(self, model: str) -> list[Sequence]:
        """When the batch is full and a tenant with waiting work holds less than its share of
        ``max_num_seqs`` (an equal split between tenants with work), preempt the newest
        sequences of tenants holding more than their share to make room for it."""
        running, waiting = self.running[model], self.waiting[model]
        if len(running) < self.config.max_num_seqs or not waiting:
            return []
        counts = Counter(q.tenant for q in running)
        tenants = set(counts) | {q.tenant for q in waiting}
        if len(tenants) < 2:
            return []
        share = max(1, self.config.max_num_seqs // len(tenants))
        in_use = {q.adapter for q in running if q.adapter}
        room = len(in_use) < self.max_adapters[model]
        want = Counter()
        for seq in waiting:  # only for sequences that could run: no preemption for nothing
            could_run = seq.adapter is None or seq.adapter in in_use or room
            if could_run and counts[seq.tenant] + want[seq.tenant] < share:
                want[seq.tenant] += 1
        out = []
        for _ in range(sum(want.values())):
            donor, held = counts.most_common(1)[0]
            if held <= share:
                break
            victim = next(q for q in reversed(running) if q.tenant == donor)
            self._preempt(victim)
            counts[donor] -= 1
            out.append(victim)
        return out

    def update_from_output(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens this step computed."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            if s.seq.cache_root is not None and self.config.enable_prefix_caching:
                self._index_full_pages(s.seq)
            self.release_behind_window(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence wherever it is and free its pages. Safe to call twice."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running[seq.model].remove(seq)
            if seq.adapter:
                self._pin_running()
        elif seq in self.waiting[seq.model]:
            self.waiting[seq.model].remove(seq)
        self._give_back(seq)
        seq.pages, seq.num_dropped_pages = [], 0
        seq.window_pages, seq.num_dropped_window_pages = [], 0
        if seq.host_pages:
            self.host_pages.free(seq.host_pages + seq.host_window_pages)
            seq.host_pages, seq.host_window_pages = [], []
        seq.status = Status.FINISHED
        seq.finish_reason = reason
