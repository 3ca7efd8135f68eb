"""Policies on integer queues: which model each one picks, and why."""

from gpupool import SamplingParams
from gpupool.pool.pages import PagePool
from gpupool.scheduler.policy import TokenPolicy, make_policy
from gpupool.scheduler.request import Sequence
from gpupool.scheduler.scheduler import Scheduler, SchedulerConfig
from gpupool.scheduler.slo import SLO, CostModel


def _sched(policy, models=("a", "b", "c")):
    s = Scheduler(SchedulerConfig(), PagePool(1000), policy=policy)
    for m in models:
        s.add_model(m, 16)
    return s


def _add(s, model, arrival, outputs=0, running=False):
    seq = Sequence(f"{model}{arrival}", model, [1, 2, 3], SamplingParams(), arrival, 999)
    seq.output_token_ids = [7] * outputs
    (s.running[model].append if running else s.waiting[model].append)(seq)
    return seq


def test_fcfs_follows_the_oldest_request():
    s = _sched(make_policy("fcfs"))
    _add(s, "b", 1.0, running=True)
    _add(s, "a", 2.0)
    assert s.policy.pick(s, 5.0) == "b"
    s.running["b"].clear()
    assert s.policy.pick(s, 5.0) == "a"


def test_request_level_stays_until_the_queue_drains():
    s = _sched(make_policy("request"))
    _add(s, "a", 1.0)
    assert s.policy.pick(s, 1.0) == "a"
    _add(s, "b", 0.5)  # older, but a still has work
    assert s.policy.pick(s, 2.0) == "a"
    s.waiting["a"].clear()
    assert s.policy.pick(s, 3.0) == "b"


def test_token_policy_serves_the_earliest_deadline_and_honours_quotas():
    cost = CostModel(default_step_s=0.01, default_swap_s=0.05)
    slo = SLO(ttft_ms=1000, tbt_ms=100)
    s = _sched(make_policy("token", cost, default_slo=slo))
    _add(s, "a", 0.0, outputs=20, running=True)  # next token due 0 + 1.0 + 2.0 = 3.0
    _add(s, "b", 1.5)  # first token due 2.5: more urgent
    assert s.policy.pick(s, 2.0) == "b"
    # alpha = 0.01 / (0.5 * 0.1) = 0.2 each, R = 0.1 / (1 - 0.4) = 1/6 s, alpha R = 1/30 s,
    # below the floor of two switch times: quota = 0.1 s
    assert abs(s.policy.quota_end - (2.0 + 0.1)) < 1e-9
    s.waiting["b"][0].output_token_ids = [1] * 30  # b now far ahead of its deadlines
    assert s.policy.pick(s, 2.05) == "b"  # inside its quota
    assert s.policy.pick(s, 2.2) == "b"  # quota over, but a's deadline (3.0) is not close
    assert s.policy.pick(s, 2.9) == "a"  # a is due within a switch + a quota: switch


def test_token_policy_uses_per_model_slos():
    s = _sched(make_policy("token", CostModel(), default_slo=SLO(1000, 100)))
    s.policy.slos["b"] = SLO(ttft_ms=100, tbt_ms=50)  # an interactive model
    _add(s, "a", 0.0)
    _add(s, "b", 0.5)  # arrived later, but its TTFT ends first (0.6 < 1.0)
    assert s.policy.pick(s, 0.55) == "b"


def test_no_work_no_model():
    for name in ("token", "request", "fcfs"):
        assert _sched(make_policy(name)).policy.pick(_sched(make_policy(name)), 0.0) is None


def test_token_policy_yields_once_a_round_ahead_and_stays_while_nobody_is_due():
    cost = CostModel(default_step_s=0.01, default_swap_s=0.05)
    slo = SLO(ttft_ms=1000, tbt_ms=100)
    s = _sched(make_policy("token", cost, default_slo=slo))
    a = _add(s, "a", 0.0, running=True)
    assert s.policy.pick(s, 0.0) == "a"
    a.output_token_ids = [7] * 30  # a's first token at 0.0, so token 30 is due ~3.0
    b = _add(s, "b", 0.5)  # b's first token is due 1.5 (planning: 0.5 + 0.75 = 1.25)
    # lead (one round): 2 switches / (1 - 2 * 0.1) = 0.125 s; b is not due within it
    assert s.policy.pick(s, 0.6) == "a"
    assert s.policy.pick(s, 1.1) == "b"  # b is due within a round, and a is far ahead
    assert s.policy.prefetch_hint(s, 1.1) == "a"
    b.output_token_ids = [7]
    s.policy.first_token[b] = 1.1
    s.waiting["b"].remove(b)
    s.running["b"].append(b)
    assert s.policy.pick(s, 1.2) == "b"  # inside b's quota


def test_prefetch_hints_name_the_next_model():
    s = _sched(make_policy("request"))
    _add(s, "a", 1.0, running=True)
    s.policy.current = "a"  # a holds the device until its queue drains
    _add(s, "c", 3.0)
    _add(s, "b", 2.0)
    assert s.policy.pick(s, 4.0) == "a" and s.policy.prefetch_hint(s, 4.0) == "b"
    f = _sched(make_policy("fcfs"))
    _add(f, "a", 1.0, running=True)
    _add(f, "c", 3.0)
    assert f.policy.pick(f, 4.0) == "a" and f.policy.prefetch_hint(f, 4.0) == "c"


def test_a_resumed_request_is_due_like_a_new_one():
    """A request moved from a dead worker with 50 tokens delivered is due at its arrival +
    TTFT here, as a new request is, not 50 TBTs later."""
    slo = SLO(ttft_ms=1000, tbt_ms=100)
    policy = TokenPolicy(slos={"m": slo})
    fresh = Sequence("a", "m", [1, 2, 3], SamplingParams(), 10.0, 999)
    resumed = Sequence("b", "m", [1, 2, 3], SamplingParams(max_tokens=200), 10.0, 999,
                       output_token_ids=list(range(50)), num_delivered=50)
    assert policy.seq_deadline(resumed, slo, 10.0) == policy.seq_deadline(fresh, slo, 10.0)
    resumed.output_token_ids.append(7)  # its first token here came at 10.5
    later = policy.seq_deadline(resumed, slo, 10.5)
    assert 10.5 < later <= 10.5 + slo.tbt_ms / 1000
