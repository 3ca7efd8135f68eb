"""The scheduler on integers alone: budgets, chunking, preemption order, page accounting."""

from collections import Counter

import pytest

from gpupool import SamplingParams
from gpupool.pool.pages import PagePool, prefix_root
from gpupool.scheduler.policy import Policy
from gpupool.scheduler.request import Sequence, Status
from gpupool.scheduler.scheduler import Scheduler, SchedulerConfig


def _seq(i, prompt_len, t=None):
    return Sequence(str(i), "m", list(range(prompt_len)), SamplingParams(), t or float(i), 999)


def _scheduler(num_pages=100, block_tokens=4, **cfg):
    s = Scheduler(SchedulerConfig(**cfg), PagePool(num_pages))
    s.add_model("m", block_tokens)
    return s


def _advance(s, out, sampled_token=7):
    s.update_from_output(out)
    for item in out.scheduled:
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(sampled_token)


def test_chunked_prefill_respects_the_token_budget():
    s = _scheduler(max_num_batched_tokens=10)
    a, b = _seq(0, 7), _seq(1, 9)
    s.enqueue(a)
    s.enqueue(b)
    out = s.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("0", 7), ("1", 3)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    _advance(s, out)
    out = s.schedule()  # a decodes 1 token, b continues with the rest of its prompt
    assert [(x.seq.request_id, x.num_new_tokens, x.is_decode) for x in out.scheduled] == [
        ("0", 1, True), ("1", 6, False)]
    assert len(a.pages) == 2 and len(b.pages) == 3


def test_max_num_seqs_caps_the_batch():
    s = _scheduler(max_num_seqs=2)
    for i in range(4):
        s.enqueue(_seq(i, 3))
    assert len(s.schedule().scheduled) == 2


def test_newest_running_sequence_is_preempted_and_requeued_first():
    s = _scheduler(num_pages=3, block_tokens=4)
    seqs = [_seq(i, 4) for i in range(3)]
    for q in seqs:
        s.enqueue(q)
    out = s.schedule()  # 3 pages used, each prompt fills its page exactly
    assert len(out.scheduled) == 3
    _advance(s, out)
    out = s.schedule()  # each needs a second page; none is free
    assert [q.request_id for q in out.preempted] == ["2", "1"]
    assert [x.seq.request_id for x in out.scheduled] == ["0"]
    assert [q.request_id for q in s.waiting["m"]] == ["1", "2"]
    assert seqs[2].status is Status.WAITING and seqs[2].pages == []
    assert seqs[2].num_computed_tokens == 0 and seqs[2].num_preemptions == 1
    s.pages.check_integrity()
    assert s.pages.num_used_pages == 2


def test_finish_frees_pages_wherever_the_sequence_is():
    s = _scheduler()
    a, b = _seq(0, 5), _seq(1, 5)
    s.enqueue(a)
    s.enqueue(b)
    s.schedule()
    s.finish(a, "abort")
    s.finish(a, "abort")  # twice is safe
    assert a.status is Status.FINISHED and a.pages == []
    c = _seq(2, 3)
    s.enqueue(c)
    s.finish(c, "abort")  # still waiting
    assert s.pages.num_used_pages == len(b.pages)
    assert not s.waiting["m"]


def test_oldest_request_picks_the_model():
    s = Scheduler(SchedulerConfig(), PagePool(10))
    s.add_model("a", 4)
    s.add_model("b", 4)
    s.enqueue(Sequence("x", "b", [1], SamplingParams(), 1.0, 99))
    s.enqueue(Sequence("y", "a", [1], SamplingParams(), 2.0, 99))
    assert s.schedule().model == "b"



class _Fixed(Policy):
    """Always the model it is told."""

    def __init__(self, model):
        self.model = model

    def pick(self, sched, now):
        return self.model


def _two_models(num_pages, running_b):
    """Model b runs ``running_b`` sequences of 8 tokens (2 pages each); then a holds the device."""
    s = Scheduler(SchedulerConfig(), PagePool(num_pages), host_pages=PagePool(16),
                  policy=_Fixed("b"))
    s.add_model("a", 4)
    s.add_model("b", 4)
    bs = [Sequence(f"b{i}", "b", list(range(8)), SamplingParams(), float(i), 99)
          for i in range(running_b)]
    for q in bs:
        s.enqueue(q)
    _advance(s, s.schedule())
    s.policy.model = "a"
    return s, bs


def test_other_models_kv_is_swapped_out_when_the_running_model_needs_pages():
    s, (b0, b1) = _two_models(5, 2)
    a = Sequence("a", "a", list(range(8)), SamplingParams(), 5.0, 99)
    s.enqueue(a)
    out = s.schedule()  # a needs 2 pages, 1 is free: the newest of b's KV goes to host pages
    assert out.model == "a" and [q.request_id for q in out.preempted] == ["b1"]
    assert len(out.swap_out) == 2 and not out.swap_in
    assert [x.seq.request_id for x in out.scheduled] == ["a"]
    assert b1.status is Status.WAITING and len(b1.host_pages) == 2
    assert b1.num_computed_tokens == 8 and b0.status is Status.RUNNING  # kept: not needed
    s.pages.check_integrity()


def test_a_swap_in_never_shares_a_step_with_a_swap_out():
    s, (b0,) = _two_models(3, 1)
    a = Sequence("a", "a", list(range(8)), SamplingParams(), 5.0, 99)
    a.num_computed_tokens, a.output_token_ids = 8, [7]
    a.host_pages = s.host_pages.allocate(2)  # a was swapped out earlier
    s.enqueue(a)
    out = s.schedule()  # a needs 3 pages, 1 is free: b0 is evicted by recompute
    assert [x.seq.request_id for x in out.scheduled] == ["a"]
    assert len(out.swap_in) == 2 and not out.swap_out
    assert b0.status is Status.WAITING and b0.num_computed_tokens == 0 and not b0.host_pages
    s.pages.check_integrity()


# ---- no stalls, fair shares ----------------------------------------------------------------
def _tseq(i, prompt_len, tenant=None, adapter=None):
    return Sequence(str(i), "m", list(range(prompt_len)), SamplingParams(), float(i), 9999,
                    adapter=adapter, tenant=tenant)


def _run(s, steps):
    outs = []
    for _ in range(steps):
        out = s.schedule()
        _advance(s, out)
        outs.append(out)
    return outs


def test_running_streams_advance_every_step_while_long_prompts_are_admitted():
    s = _scheduler(num_pages=2000, max_num_batched_tokens=512,
                   max_prefill_tokens_while_decoding=64)
    streams = [_tseq(i, 5) for i in range(4)]
    for q in streams:
        s.enqueue(q)
    _run(s, 2)  # prefilled, now decoding
    for i in range(10):
        s.enqueue(_tseq(10 + i, 400))
    for out in _run(s, 30):
        decoding = {x.seq.request_id for x in out.scheduled if x.is_decode}
        assert {q.request_id for q in streams} <= decoding  # every step: k = 1
        assert sum(x.num_new_tokens for x in out.scheduled if not x.is_decode) <= 64
    assert any(len(q.output_token_ids) for q in s.running["m"] if int(q.request_id) >= 10)


def test_a_short_prompt_is_not_split_while_streams_decode():
    s = _scheduler(num_pages=2000, max_num_batched_tokens=512,
                   max_prefill_tokens_while_decoding=32)
    s.enqueue(_tseq(0, 5))
    _run(s, 2)  # decoding
    s.enqueue(_tseq(1, 50))  # more than the cap, less than twice: whole
    s.enqueue(_tseq(2, 50))  # would make the step's prompt tokens exceed twice the cap
    out = s.schedule()
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("0", 1),
                                                                             ("1", 50)]


def test_the_prefill_cap_follows_the_tbt_slo_and_the_measured_token_cost():
    from gpupool.scheduler.slo import SLO

    s = _scheduler(max_num_batched_tokens=1024)
    assert s.prefill_cap("m") == 1024  # nothing measured yet: the whole budget
    s.policy.cost.observe_step("m", 0.5, 100, 100)  # 5 ms per prompt token
    s.policy.set_slo("m", SLO(2000, 200))
    assert s.prefill_cap("m") == 20  # half of 200 ms at 5 ms a token
    s.policy.set_slo("m", SLO(2000, 20))
    assert s.prefill_cap("m") == 16  # never below the minimum chunk
    s.policy.set_slo("m", SLO(2000, 100_000))
    assert s.prefill_cap("m") == 1024
    s.policy.set_slo("m", SLO(2000, 200))
    s.policy.cost.observe_step("m", 0.3, 64, 0)  # 64 decode rows alone take 300 ms
    assert s.prefill_cap("m", 64) == 60  # prompts get as long as decoding: 300 ms / 5 ms
    s.policy.cost.observe_step("m", 0.1, 16, 0)  # fitted: 300 ms = 33 ms + 64 x 4.2 ms
    assert s.prefill_cap("m", 128) == 113  # 128 rows: 567 ms
    assert s.prefill_cap("m", 8) == 20  # 8 rows take 67 ms: half the TBT is more


def test_the_cost_of_a_prompt_token_leaves_out_the_decode_rows():
    from gpupool.scheduler.slo import CostModel

    cost = CostModel(smoothing=1.0)
    cost.observe_step("m", 0.2, 40, 0)  # 40 decode rows: 5 ms a row
    cost.observe_step("m", 0.5, 140, 100)  # 40 rows (200 ms) + 100 prompt tokens (300 ms)
    assert abs(cost.token("m") - 0.003) < 1e-9


def test_each_tenant_with_waiting_work_gets_its_share_of_batch_slots():
    s = _scheduler(num_pages=1000, max_num_seqs=8)
    for i in range(20):
        s.enqueue(_tseq(i, 6, tenant="flood"))
    _run(s, 3)
    assert len(s.running["m"]) == 8
    for i in range(3):
        s.enqueue(_tseq(100 + i, 6, tenant="quiet"))
    out = s.schedule()
    _advance(s, out)
    tenants = Counter(x.seq.tenant for x in out.scheduled)
    assert tenants["quiet"] == 3 and tenants["flood"] == 5
    assert [q.tenant for q in out.preempted] == ["flood"] * 3
    for out in _run(s, 5):  # and keeps it
        assert Counter(x.seq.tenant for x in out.scheduled)["quiet"] == 3


def test_a_quiet_tenant_is_admitted_before_a_flood_that_came_first():
    s = _scheduler(max_num_seqs=2)
    for i in range(6):
        s.enqueue(_tseq(i, 4, tenant="flood"))
    s.enqueue(_tseq(50, 4, tenant="quiet"))
    assert [x.seq.request_id for x in s.schedule().scheduled] == ["0", "50"]


def test_running_sequences_left_out_for_want_of_budget_go_first_next_step():
    s = _scheduler(max_num_batched_tokens=24, max_num_seqs=6)
    for i in range(6):
        s.enqueue(_tseq(i, 4))
    _run(s, 1)  # all six prefilled (24 tokens), now decoding
    s.config = SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=6)
    ran = [{x.seq.request_id for x in out.scheduled} for out in _run(s, 6)]
    for a, b in zip(ran, ran[1:]):  # four a step, so each runs at least every second step
        assert len(a) == 4 and a | b == {str(i) for i in range(6)}


def test_no_fairness_preemption_for_a_sequence_that_could_not_run():
    """The quiet tenant's adapter has no slot while the flood's holds the only one: preempting
    the flood would only throw its work away, step after step."""
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_prefill_tokens_while_decoding=16),
                  PagePool(1000))
    s.add_model("m", 4, max_adapters=1)
    flood = [_tseq(0, 4, "A", "x"), _tseq(1, 100, "A", "x")]
    for q in flood:
        s.enqueue(q)
    _run(s, 8)
    s.enqueue(_tseq(2, 4, "B", "y"))
    for out in _run(s, 8):
        assert not out.preempted
    assert flood[1].num_preemptions == 0 and len(flood[1].output_token_ids) > 1


def test_another_tenants_short_prompt_is_admitted_while_a_long_prompt_prefills():
    """Tenant A's 8000-token prompt prefills in chunks; tenant B's 20-token prompt arrives:
    it is admitted whole in the next step (a share of the step's budget is kept for waiting
    tenants), and A's chunks go on beside it. One tenant alone keeps the whole budget."""
    s = _scheduler(num_pages=4000, max_num_batched_tokens=1024)
    a = _tseq(0, 8000, tenant="A")
    s.enqueue(a)
    first = _run(s, 2)
    assert [x.num_new_tokens for out in first for x in out.scheduled] == [1024, 1024]
    b = _tseq(1, 20, tenant="B")
    s.enqueue(b)
    out = _run(s, 1)[0]
    got = {x.seq.request_id: x.num_new_tokens for x in out.scheduled}
    assert got.get("1") == 20  # B whole, in the step after it came
    assert got.get("0", 0) >= 512  # A keeps going
    assert b.output_token_ids  # B's first token after one step
    # A's own later prompts (same tenant) wait behind it as before: no reserve for them
    s2 = _scheduler(num_pages=4000, max_num_batched_tokens=1024)
    s2.enqueue(_tseq(0, 8000, tenant="A"))
    _run(s2, 1)
    s2.enqueue(_tseq(1, 20, tenant="A"))
    out = _run(s2, 1)[0]
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("0", 1024)]


def _one_slot(**cfg):
    """One adapter a step fits; adapter "a" is on the device."""
    s = Scheduler(SchedulerConfig(max_num_seqs=8, **cfg), PagePool(200))
    s.add_model("m", 4, max_adapters=1)
    s.resident_adapters["m"] = {"a"}
    return s


def _aseq(i, adapter, t):
    return Sequence(str(i), "m", [1, 2, 3], SamplingParams(), t, 999, adapter=adapter)


def test_a_request_whose_adapter_is_on_the_device_goes_before_a_cold_one_for_a_while():
    ids = lambda out: [x.seq.request_id for x in out.scheduled]  # noqa: E731
    for wait_ms, now, first in ((500.0, 10.2, "1"),  # b is cold, a warm: a first
                                (0.0, 10.2, "0"),  # no preference: arrival order
                                (500.0, 10.6, "0")):  # b waited 600 ms: it keeps its place
        s = _one_slot(adapter_wait_ms=wait_ms)
        s.enqueue(_aseq(0, "b", 10.0))
        s.enqueue(_aseq(1, "a", 10.1))
        assert ids(s.schedule(now=now)) == [first], (wait_ms, now)


def test_a_cold_adapters_wait_is_bounded_under_a_stream_of_warm_requests():
    """A request for adapter a arrives every 100 ms and runs 3 tokens; b's request arrives at
    t=0.05. Without the bound a's requests pass b forever (the step's one adapter is always a);
    with it, nothing passes b after 500 ms, a's running requests drain, and b runs."""
    def first_step_of_b(wait_ms):
        s = _one_slot(adapter_wait_ms=wait_ms)
        b = _aseq("b", "b", 0.05)
        for k in range(60):
            now = 0.1 * k
            s.enqueue(_aseq(k, "a", now))
            if k == 1:
                s.enqueue(b)
            out = s.schedule(now=now)
            if any(x.seq is b for x in out.scheduled):
                return now
            _advance(s, out)
            for q in list(s.running["m"]):
                if len(q.output_token_ids) >= 3:
                    s.finish(q, "length")
        return None

    assert first_step_of_b(0.0) is None
    got = first_step_of_b(500.0)
    assert got is not None and got <= 0.05 + 0.5 + 0.4, got  # the bound, 3 tokens of drain


def test_the_bound_holds_back_adapter_requests_only_and_whatever_the_tenant_order():
    """b (adapter, tenant B) is overdue while a's requests hold the one adapter: a request of
    tenant C for a that arrived after b became overdue waits, even though C's place in the
    fair order comes before b's (fewer running); a base-model request that arrived then is
    admitted (it holds no adapter)."""
    s = _one_slot(adapter_wait_ms=500.0)
    first = Sequence("a0", "m", [1, 2, 3], SamplingParams(), 0.0, 999, adapter="a",
                     tenant="A")
    s.enqueue(first)
    _advance(s, s.schedule(now=0.0))  # a0 runs: the step's one adapter is a
    b = Sequence("b", "m", [1, 2, 3], SamplingParams(), 0.1, 999, adapter="b", tenant="A")
    late = Sequence("c", "m", [1, 2, 3], SamplingParams(), 0.7, 999, adapter="a",
                    tenant="C")
    base = Sequence("d", "m", [1, 2, 3], SamplingParams(), 0.7, 999, tenant="D")
    for q in (b, late, base):
        s.enqueue(q)
    out = s.schedule(now=0.8)  # b overdue since 0.6
    ran = {x.seq.request_id for x in out.scheduled}
    assert "d" in ran and "c" not in ran and "b" not in ran


def test_an_admitted_requests_adapter_keeps_its_pages_through_other_preemptions():
    """Adapters' device copies share the pool (adapters/paged.py): a waiting request whose
    adapter is on the device, idle, is admitted while another model's request on an adapter
    is preempted to make room; the admitted request's adapter stays pinned through that
    preemption (which re-pins the running ones), so its own KV pages never evict it and the
    scheduler preempts enough instead."""
    pool = PagePool(10)
    s = Scheduler(SchedulerConfig(enable_prefix_caching=False, adapter_wait_ms=0), pool)
    s.add_model("M1", 4)
    s.add_model("M2", 4)
    sizes = {("M1", "A"): 3, ("M2", "X"): 1}
    for m in ("M1", "M2"):
        s.adapter_pages[m] = lambda name, m=m: ((m, name), sizes[m, name], 1.0)
    pool.allocate_adapter(("M1", "A"), 3, 1.0)  # on the device, idle
    pool.set_pinned(())

    def running(rid, model, ntok, adapter, t):
        q = Sequence(rid, model, list(range(ntok)), SamplingParams(), t, 100, adapter=adapter)
        q.pages = pool.allocate(-(-ntok // 4))
        q.num_computed_tokens = ntok - 1
        q.status = Status.RUNNING
        s.running[model].append(q)
    running("old", "M2", 20, None, 1.0)
    pool.allocate_adapter(("M2", "X"), 1, 1.0)
    running("new", "M2", 4, "X", 2.0)
    w = Sequence("w", "M1", list(range(12)), SamplingParams(), 0.0, 100, adapter="A")
    s.enqueue(w)
    out = s.schedule(now=10.0)
    assert w.status is Status.RUNNING and [x.seq for x in out.scheduled] == [w]
    assert pool.adapter_pages(("M1", "A")) is not None and pool.is_pinned(("M1", "A"))
    assert pool.num_adapters_evicted == 0  # room came from preempting, not from A
    assert sorted(q.request_id for q in out.preempted) == ["new", "old"]
    assert not pool.is_pinned(("M2", "X"))  # its request was preempted: idle
    pool.check_integrity()


def _windowed(num_pages=100, window=6, **cfg):
    s = Scheduler(SchedulerConfig(**cfg), PagePool(num_pages))
    s.add_model("m", 4, window=window)  # 4 tokens a block; every layer sees its last 6 keys
    return s


def _alone(s, seq, pages, steps: int = 30):
    """Run ``seq`` alone for ``steps`` steps, yielding after each the most of ``pages(seq)``
    it held at once so far."""
    s.enqueue(seq)
    most = 0
    for _ in range(steps):
        out = s.schedule()
        most = max(most, len(pages(seq)))
        _advance(s, out)
        yield most


def test_a_model_with_a_global_layer_keeps_every_page():
    s = _windowed(window=0)
    seq = _seq(0, 21)
    s.enqueue(seq)
    for _ in range(10):
        _advance(s, s.schedule())
    assert seq.num_dropped_pages == 0 and len(seq.pages) == -(-seq.num_computed_tokens // 4)
    assert s.peak_pages("m", 999) == -(-999 // 4)


def test_a_windowed_prefix_hit_needs_only_the_blocks_its_window_reaches():
    """The first prompt's early blocks, released behind its window and cached, are evicted
    while it still runs (nothing else is evictable then); the same prompt again still
    skips 28 of its 30 tokens: its first computed token (28) sees keys 23.. only, in
    blocks 5 and 6."""
    s = _windowed(num_pages=10, window=6, max_num_batched_tokens=32)
    root = prefix_root("m", None, None)
    first = Sequence("a", "m", list(range(30)), SamplingParams(), 0.0, 999, cache_root=root)
    s.enqueue(first)
    _advance(s, s.schedule())  # blocks 0-5 released (behind token 30's window), cached
    assert first.num_dropped_pages == 6 and s.pages.num_cached_pages == 7
    taken = s.pages.allocate(s.pages.num_free_pages - s.pages.num_cached_pages + 5)
    s.pages.free(taken)  # the free list, then the least recent cached: blocks 0-4
    s.finish(first, "stop")
    again = Sequence("b", "m", list(range(30)), SamplingParams(), 1.0, 999, cache_root=root)
    s.enqueue(again)
    out = s.schedule()
    assert again.num_dropped_pages == 5 and len(again.pages) == 3  # 5, 6 + new 7
    assert out.scheduled[0].num_new_tokens == 2 and s.cache_hits["m"] == 28
    s.pages.check_integrity({p: 1 for p in again.pages})


def test_a_finished_prompts_cached_blocks_are_evicted_from_its_tail():
    """A prompt's 7 cached blocks: taking 3 pages more than the free list evicts its last
    3 (blocks 4-6), not its first (which would leave no hit): the same prompt again still
    skips its first 16 tokens. With every layer windowed, the blocks it released while it
    ran are touched again when it finishes, each in its place."""
    for window in (0, 6):
        s = _windowed(num_pages=10, window=window, max_num_batched_tokens=32)
        root = prefix_root("m", None, None)
        first = Sequence("a", "m", list(range(30)), SamplingParams(), 0.0, 999,
                         cache_root=root)
        s.enqueue(first)
        _advance(s, s.schedule())
        s.finish(first, "stop")
        assert s.pages.num_cached_pages == 7  # full blocks 0..6
        taken = s.pages.allocate(s.pages.num_free_pages - s.pages.num_cached_pages + 3)
        s.pages.free(taken)
        again = Sequence("b", "m", list(range(30)), SamplingParams(), 1.0, 999,
                         cache_root=root)
        s.enqueue(again)
        out = s.schedule()
        assert s.cache_hits["m"] == 16 and out.scheduled[0].num_new_tokens == 14
        s.pages.check_integrity({p: 1 for p in again.pages})


# ---- a model mixing global and windowed layers: two KV groups ------------------------------
def _mixed(num_pages=100, block_tokens=8, window_tokens=4, host=0, **cfg):
    """Model m: its global layers' blocks ``block_tokens`` tokens a page, its windowed layers'
    (a group of their own, each token seeing its last 6 keys) ``window_tokens``."""
    s = Scheduler(SchedulerConfig(**cfg), PagePool(num_pages), PagePool(host) if host else None)
    s.add_model("m", block_tokens, window_group=(window_tokens, 6))
    return s


@pytest.mark.parametrize("mixed", [False, True])
def test_pages_behind_a_window_are_released_as_a_sequence_grows(mixed):
    """A token at position p sees keys p - 5 .. p: the blocks (of 4 tokens) wholly before the
    next token's window are freed after each step, and the table keeps their places. Every
    layer windowed: the sequence's pages; a model mixing global and windowed layers: its
    windowed layers' own (``window_`` pages), its global layers' (8 tokens a page) kept."""
    s = _mixed(max_num_batched_tokens=8) if mixed else _windowed(max_num_batched_tokens=8)
    seq = _seq(0, 21)
    group = "window_" if mixed else ""
    window = (6 - 1 + 8) // 4 + 2  # the window's blocks and a step's tokens
    for most in _alone(s, seq, lambda q: getattr(q, group + "pages")):
        assert most <= window
        n = seq.num_computed_tokens
        held, dropped = getattr(seq, group + "pages"), getattr(seq, f"num_dropped_{group}pages")
        assert dropped == max(0, n - 5) // 4 and dropped + len(held) == -(-n // 4)
        assert getattr(seq, group + "block_table") == [0] * dropped + held
        if mixed:
            assert seq.num_dropped_pages == 0 and len(seq.pages) == -(-n // 8)
            assert not set(seq.pages) & set(seq.window_pages)
        s.pages.check_integrity({p: 1 for p in seq.pages + seq.window_pages})
    assert seq.num_computed_tokens == 48  # 21 in 3 chunks, then 27 decoded
    assert getattr(seq, f"num_dropped_{group}pages") == s.num_released_pages == (48 - 5) // 4
    assert s.peak_pages("m", 999) == window + (-(-999 // 8) if mixed else 0)
    if mixed:  # 20 pages: the window's 5, then 15 of 8 tokens (120), not 20 of 4 or 8
        assert s.max_tokens("m", 20, 999) == 120
    s.finish(seq, "length")
    assert s.pages.num_used_pages == 0 and s.pages.num_free_pages == 100


def test_a_mixed_models_preemption_swaps_both_groups_out_and_back():
    """Two sequences decode until the global pages they gain fill the pool: the newer one's
    pages of both groups go to host pages (its released window blocks stay released), and
    come back, each group's in order, when it resumes."""
    s = _mixed(num_pages=16, host=40, max_num_batched_tokens=64)
    a, b = _seq(0, 20), _seq(1, 20)
    s.enqueue(a)
    s.enqueue(b)
    for _ in range(40):
        held = (list(b.pages), list(b.window_pages), b.num_computed_tokens,
                b.num_dropped_window_pages)
        out = s.schedule()
        if out.preempted:
            break
        _advance(s, out)
    assert [q.request_id for q in out.preempted] == ["1"]
    assert list(out.swap_out) == list(zip(held[0] + held[1],
                                          b.host_pages + b.host_window_pages))
    assert (len(b.host_pages), len(b.host_window_pages)) == (len(held[0]), len(held[1]))
    assert len(held[0]) > 3 and held[1]  # (the global pages grew, the window's did not)
    assert b.num_computed_tokens == held[2] and b.num_dropped_window_pages == held[3] > 0
    assert not b.pages and not b.window_pages
    _advance(s, out)
    host = (b.host_pages, b.host_window_pages)
    s.finish(a, "stop")
    out = s.schedule()  # b resumes: its blocks back in new pages of each group, in order
    assert [x.seq.request_id for x in out.scheduled] == ["1"]
    assert list(out.swap_in) == (list(zip(b.pages, host[0]))
                                 + list(zip(b.window_pages, host[1])))
    n = b.num_computed_tokens + 1  # (its next token's pages too)
    assert len(b.pages) == -(-n // 8) and b.num_dropped_window_pages == held[3]
    assert b.num_dropped_window_pages + len(b.window_pages) == -(-n // 4)
    assert s.host_pages.num_used_pages == 0
    s.pages.check_integrity({p: 1 for p in b.pages + b.window_pages})


def test_a_mixed_models_prefix_hit_takes_its_global_pages_and_its_windows_own():
    """30 tokens cached; the same prompt again skips 24: every global block before it, and
    of the windowed layers' blocks only those token 24's window (keys 19..) reaches. With
    blocks of 8 and 4 tokens: global 0-2, window 4-5; of 4 and 8: global 0-5 (28 is no
    window block's end), window 2."""
    for bt, wbt, pages, window in ((8, 4, (3, 4), (4, 2, 4)), (4, 8, (6, 8), (2, 1, 2))):
        s = _mixed(num_pages=30, block_tokens=bt, window_tokens=wbt, max_num_batched_tokens=32)
        root = prefix_root("m", None, None)
        first = Sequence("a", "m", list(range(30)), SamplingParams(), 0.0, 999, cache_root=root)
        s.enqueue(first)
        _advance(s, s.schedule())
        s.finish(first, "stop")
        assert s.pages.num_cached_pages == 30 // bt + 30 // wbt
        again = Sequence("b", "m", list(range(30)), SamplingParams(), 1.0, 999,
                         cache_root=root)
        s.enqueue(again)
        out = s.schedule()
        assert out.scheduled[0].num_new_tokens == 6 and s.cache_hits["m"] == 24
        assert (pages[0], len(again.pages)) == (24 // bt, -(-30 // bt))
        assert (again.num_dropped_window_pages, window[1],
                len(again.window_pages)) == window
        s.pages.check_integrity({p: 1 for p in again.pages + again.window_pages})


def test_a_mixed_models_hit_ends_earlier_where_its_window_pages_are_gone():
    """The first prompt's cached blocks evicted from the tail (two pages: its windowed
    layers' blocks 6 and 5, of tokens 24.. and 20..): its global blocks 0-2 are still
    cached but token 24's window (blocks 4, 5) is not, so the hit ends at 16 (window
    blocks 2 and 3, released while it ran and touched again when it finished)."""
    s = _mixed(num_pages=30, max_num_batched_tokens=32)
    root = prefix_root("m", None, None)
    first = Sequence("a", "m", list(range(30)), SamplingParams(), 0.0, 999, cache_root=root)
    s.enqueue(first)
    _advance(s, s.schedule())
    assert first.num_dropped_window_pages == 6  # (blocks 0-5 released, cached)
    s.finish(first, "stop")
    window = [s.pages.lookup([s._window_page_key(first, j)]) for j in range(7)]
    free = s.pages.num_free_pages - s.pages.num_cached_pages
    taken = s.pages.allocate(free + 2)  # the free list, then the tail: blocks 6, 5
    assert [s.pages.lookup([s._window_page_key(first, j)]) for j in range(7)] == (
        window[:5] + [[], []])
    s.pages.free(taken)
    again = Sequence("b", "m", list(range(30)), SamplingParams(), 1.0, 999, cache_root=root)
    s.enqueue(again)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 14 and s.cache_hits["m"] == 16
    assert again.num_dropped_window_pages == 2
    assert again.window_pages[:2] == window[2] + window[3]
    s.pages.check_integrity({p: 1 for p in again.pages + again.window_pages})
