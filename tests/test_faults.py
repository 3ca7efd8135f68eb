"""Faults inside the engine hurt only what they touch: a request whose logits go bad fails
alone; a failure the engine cannot step past fails what is in flight, then the engine resets
and serves the next request with every model and adapter still registered."""

import threading

import pytest

from gpupool import SamplingParams
from gpupool.adapters.paged import RawCopy
from tests.factories import engine_alone, make_engine, make_peft_adapter, random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"good": make_peft_adapter(base, root / "good", 4, ["q_proj", "v_proj"], seed=1),
            "bad": make_peft_adapter(base, root / "bad", 4, ["q_proj", "v_proj"], seed=2)}


def _poison(engine, adapter: str) -> None:
    """Fault injection: NaN into an adapter's host copy (its first use refuses NaN files, so
    this stands for memory gone bad after it)."""
    paged = engine.local.core.workers["m"].adapter_pages
    host = paged.load_host(adapter)
    if isinstance(host, RawCopy):  # the file's values, packed at each load
        host.values.fill_(float("nan"))
        return
    paged.layout.main(host).fill_(float("nan"))
    if paged.layout.bf16(host) is not None:
        paged.layout.bf16(host).fill_(float("nan"))


def test_nan_logits_fail_only_their_request(base, adapters):
    prompts = random_prompts(4, 5, 12, seed=7)
    want = engine_alone(base, prompts, GREEDY)
    engine = make_engine(base)
    try:
        for name, path in adapters.items():
            engine.add_adapter(name, "m", path)
        _poison(engine, "bad")
        names = ["m", "bad", "good", "m", "bad"]
        outs = engine.generate(prompts + prompts[:1], GREEDY, model=names)
        by_name = dict(zip(range(5), outs))
        for i in (1, 4):
            assert by_name[i].error and "NaN or infinite" in by_name[i].error
            assert by_name[i].finish_reason == "abort"
        assert [list(by_name[i].token_ids) for i in (0, 3)] == [want[0], want[3]]
        assert by_name[2].error is None and len(by_name[2].token_ids) == 12
        engine.check_integrity()
        again = engine.generate(prompts[2:3], GREEDY, model="good")[0]  # the engine goes on
        assert list(again.token_ids) == list(by_name[2].token_ids)
    finally:
        engine.shutdown()


def test_a_failure_the_engine_cannot_step_past_fails_in_flight_then_it_recovers(base,
                                                                                 adapters):
    prompts = random_prompts(3, 5, 12, seed=8)
    want = engine_alone(base, prompts, GREEDY)
    engine = make_engine(base)
    try:
        engine.add_adapter("good", "m", adapters["good"])
        real = engine.local.core.scheduler.schedule
        started = threading.Event()
        calls = {"n": 0}

        def faulty(*a, **kw):  # fault injection: the third step's scheduling blows up
            calls["n"] += 1
            if calls["n"] == 3:
                started.set()
                raise RuntimeError("injected scheduler fault")
            return real(*a, **kw)

        engine.local.core.scheduler.schedule = faulty
        outs = engine.generate(prompts + prompts[:1],
                               SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                               model=["m", "m", "m", "good"])
        assert started.is_set()
        assert all(o.finish_reason == "abort" and "injected scheduler fault" in o.error
                   for o in outs)
        engine.check_integrity()
        assert engine.local.kv.pages.num_used_pages == 0
        assert engine.models == ["m"] and engine.adapters == {"good": "m"}
        engine.local.core.scheduler.schedule = real
        assert [list(o.token_ids) for o in engine.generate(prompts, GREEDY)] == want
        assert engine.generate(prompts[:1], GREEDY, model="good")[0].error is None
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_a_row_the_processors_overflow_fails_alone(base):
    """Validation keeps repetition_penalty in range; past it (forced here) logits overflow to
    inf: that request fails, its batch mate is untouched."""
    prompts = random_prompts(2, 5, 12, seed=9)
    want = engine_alone(base, prompts[:1], GREEDY)
    bad = SamplingParams(max_tokens=12, temperature=0.7, ignore_eos=True, seed=1)
    object.__setattr__(bad, "repetition_penalty", 1e-40)  # fault injection
    engine = make_engine(base)
    try:
        outs = engine.generate(prompts, [GREEDY, bad])
        assert list(outs[0].token_ids) == want[0] and outs[0].error is None
        assert outs[1].finish_reason == "abort" and "NaN or infinite" in outs[1].error
        engine.check_integrity()
    finally:
        engine.shutdown()
