"""Engine behaviour: sampling, stops, streaming, aborts and bad input."""

import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from gpupool import RequestError, SamplingParams
from gpupool.engine.sampler import filtered_probs
from gpupool.messages.types import EngineRequest
from tests.factories import make_engine, random_prompts


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = make_engine(tiny_models("llama"))
    yield e
    e.shutdown()


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    prompts = random_prompts(6, 3, 25, seed=5)
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=1234,
                       ignore_eos=True)
    alone = engine.generate(prompts[0], p)[0].token_ids
    again = engine.generate(prompts[0], p)[0].token_ids
    # the same request inside a batch of other, differently seeded/greedy requests
    mixed_params = [p] + [SamplingParams(max_tokens=12, temperature=0.7, seed=i)
                          for i in range(4)] + [SamplingParams(max_tokens=3, temperature=0)]
    batched = engine.generate(prompts, mixed_params)[0].token_ids
    assert alone == again == batched
    other_seed = engine.generate(prompts[0], SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone  # the seed matters


def test_top_k_one_is_greedy(engine):
    prompt = random_prompts(1, 5, 5, seed=6)[0]
    greedy = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0]
    topk1 = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=2.0, top_k=1,
                                                   seed=3))[0]
    assert greedy.token_ids == topk1.token_ids


def test_filtered_probs_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = filtered_probs(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = filtered_probs(logits, SamplingParams(top_p=0.45))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_max_tokens_and_stop_token_ids(engine):
    prompt = random_prompts(1, 8, 8, seed=7)[0]
    full = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0,
                                                  ignore_eos=True))[0]
    assert len(full.token_ids) == 10 and full.finish_reason == "length"
    stop_id = full.token_ids[4]
    cut = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[stop_id]))[0]
    k = full.token_ids.index(stop_id)
    assert cut.token_ids == full.token_ids[: k + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id


def test_stop_string_truncates_text(engine):
    prompt = random_prompts(1, 8, 8, seed=8)[0]
    full = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0,
                                                  ignore_eos=True))[0]
    words = full.text.split()
    stop = words[3]
    cut = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                 stop=[stop, "never-there"]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    # no token after the one that completed the stop string is kept (or counted)
    k = next(i for i in range(1, 11) if stop in engine.tokenizer("m").decode(
        full.token_ids[:i], skip_special_tokens=True))
    assert cut.token_ids == full.token_ids[:k]
    # the engine let go of the request before generate returned
    assert engine.local.kv.pages.num_used_pages == 0 and not engine.local.core.requests


def test_generate_inside_a_running_event_loop(engine):
    prompt = random_prompts(1, 8, 8, seed=8)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = engine.generate(prompt, params)[0]

    async def inside():  # a notebook cell, an async application
        return engine.generate(prompt, params)[0]

    assert asyncio.run(inside()).token_ids == want.token_ids


def test_add_request_is_token_level_and_refuses_stop_strings(engine):
    with pytest.raises(RequestError, match="stop strings"):
        engine.add_request([5, 6], SamplingParams(stop=["x"]))


def test_text_prompts_and_detokenised_text(engine):
    tok = engine.tokenizer("m")
    out = engine.generate("w10 w11 w12", SamplingParams(max_tokens=8, temperature=0,
                                                        ignore_eos=True))[0]
    assert list(out.prompt_token_ids) == tok("w10 w11 w12")["input_ids"]
    assert out.text.strip() == tok.decode(out.token_ids, skip_special_tokens=True).strip()


def test_stream_deltas_add_up_and_match_generate(engine):
    prompt = random_prompts(1, 6, 6, seed=9)[0]
    p = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    want = engine.generate(prompt, p)[0]

    async def consume():
        return [o async for o in engine.stream(prompt, p)]

    outs = asyncio.run(consume())
    assert outs[-1].finished and outs[-1].token_ids == want.token_ids
    assert "".join(o.delta_text for o in outs) == want.text
    assert sum(len(o.delta_token_ids) for o in outs) == 9
    assert all(not o.finished for o in outs[:-1])


def test_leaving_a_stream_early_aborts_and_frees_pages(engine):
    prompt = random_prompts(1, 6, 6, seed=10)[0]

    async def take_two():
        agen = engine.stream(prompt, SamplingParams(max_tokens=200, temperature=0,
                                                    ignore_eos=True))
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return got

    got = asyncio.run(take_two())
    assert not got[-1].finished
    engine.generate(prompt, SamplingParams(max_tokens=2))  # the loop has moved on
    engine.check_integrity()
    assert engine.local.kv.pages.num_used_pages == 0


@pytest.mark.parametrize("make_bad,match", [
    (lambda: ("", SamplingParams()), "empty"),
    (lambda: ([[]], SamplingParams()), "empty"),
    (lambda: ([5] * 300, SamplingParams()), "context window"),
    (lambda: ([5, 10**6], SamplingParams()), "token ids"),
])
def test_bad_prompts_raise_clear_errors(engine, make_bad, match):
    prompt, params = make_bad()
    with pytest.raises(RequestError, match=match):
        engine.generate(prompt, params)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_an_empty_list_of_prompts_returns_nothing(engine):
    assert engine.generate([], SamplingParams()) == []


def test_unknown_model_and_path(engine):
    with pytest.raises(RequestError, match="not loaded"):
        engine.generate([1, 2, 3], SamplingParams(), model="nope")
    from gpupool import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.add_model("x", "/no/such/model")
    with pytest.raises(RequestError, match="already loaded"):
        engine.add_model("m", "/no/such/model")
    assert engine.models == ["m"]


def test_bad_input_never_disturbs_running_requests(engine):
    prompts = random_prompts(4, 5, 20, seed=11)
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    want = engine.generate(prompts, p)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("outs", engine.generate(prompts, p)))
    t.start()
    errors = 0
    for bad in ("", [5] * 300, [-1]):
        with pytest.raises(RequestError):
            engine.generate(bad, p)
        errors += 1
    with pytest.raises(RequestError):  # one bad prompt in a batch: nothing of it is queued
        engine.generate([prompts[0], ""], p)
    t.join(timeout=120)
    assert errors == 3
    assert [o.token_ids for o in results["outs"]] == [o.token_ids for o in want]
    engine.check_integrity()


def test_request_larger_than_the_whole_kv_pool_is_refused(tiny_models):
    e = make_engine(tiny_models("llama"), kv_cache_bytes=8192, kv_page_bytes=4096)
    try:  # 2 pages of 8 tokens
        with pytest.raises(RequestError, match="KV cache"):
            e.generate([5] * 10, SamplingParams(max_tokens=10))
        assert len(e.generate([5] * 10, SamplingParams(max_tokens=6))[0].token_ids) <= 6
    finally:
        e.shutdown()


def test_requests_as_large_as_the_whole_kv_pool_finish_together(tiny_models):
    """What is admitted can always finish: each of three requests needs every page, so they
    take turns (preempted, swapped out or recomputed), never wait for ever."""
    e = make_engine(tiny_models("llama"), kv_cache_bytes=8192, kv_page_bytes=4096)
    try:  # 2 pages of 8 tokens
        params = SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)
        outs = e.generate([[5] * 5, [6] * 5, [7] * 5], params)
        assert [len(o.token_ids) for o in outs] == [11, 11, 11]
        assert all(o.finish_reason == "length" for o in outs)
        e.check_integrity()
    finally:
        e.shutdown()


def test_logprobs_match_transformers_log_softmax(engine, tiny_models):
    from transformers import AutoModelForCausalLM

    prompt = [5, 9, 14, 20]
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=3, logprobs=4)
    out = engine.generate([prompt, [7, 8]], [params, SamplingParams(max_tokens=3)])
    assert out[1].logprobs is None  # only requests that ask get them
    lps = out[0].logprobs
    assert [t for t, _, _ in lps] == list(out[0].token_ids)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models("llama")), dtype=torch.float32)
    ids = torch.tensor([prompt + list(out[0].token_ids)])
    with torch.no_grad():
        want = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    for k, (token, lp, top) in enumerate(lps):
        row = want[len(prompt) - 1 + k]  # raw distribution: before temperature
        assert lp == pytest.approx(float(row[token]), abs=1e-4)
        top_ids = torch.topk(row, 4).indices.tolist()
        assert [i for i, _ in top] == top_ids
        assert [v for _, v in top] == pytest.approx(row[top_ids].tolist(), abs=1e-4)


def test_an_unexpected_step_failure_fails_its_requests_not_the_engine(engine, monkeypatch):
    calls = []
    real = engine.local.core._process

    def broken(*args):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(engine.local.core, "_process", broken)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.finish_reason == "abort" and "boom" in out.error
    again = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert again.error is None and len(again.token_ids) == 3
    assert engine.alive
    engine.check_integrity()


def _generate_within(engine, prompt, params, seconds=120.0):
    """engine.generate on a daemon thread: a dead engine loop fails the test, not hangs it."""
    out = []
    t = threading.Thread(target=lambda: out.extend(engine.generate(prompt, params)), daemon=True)
    t.start()
    t.join(timeout=seconds)
    assert out, "the engine loop no longer serves requests"
    return out


def test_a_stream_left_while_the_engine_is_busy_does_not_stop_the_loop(engine):
    """The abort of a stream left early is applied after its event loop has closed (here:
    the engine lock is held by another thread, as by a step, while asyncio.run returns);
    outputs for it then have nowhere to go, which must not end the engine loop."""
    prompt = random_prompts(1, 6, 6, seed=12)[0]
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with engine.local._lock:
            held.set()
            release.wait(timeout=60)

    async def take_one():
        agen = engine.stream(prompt, SamplingParams(max_tokens=200, temperature=0,
                                                    ignore_eos=True))
        first = await agen.__anext__()
        holder = threading.Thread(target=hold_the_lock, daemon=True)
        holder.start()
        held.wait(timeout=60)
        await agen.aclose()  # the abort is queued: the lock is busy
        return first, holder

    first, holder = asyncio.run(take_one())  # the stream's event loop is closed now
    release.set()
    holder.join()
    assert not first.finished
    out = _generate_within(engine, prompt, SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].token_ids) == 2 and engine.alive
    engine.check_integrity()
    assert engine.local.kv.pages.num_used_pages == 0


def test_a_failing_sink_aborts_its_request_only(engine):
    prompts = random_prompts(3, 5, 12, seed=13)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = engine.generate(prompts, p)
    calls, results, done = [], {}, threading.Event()

    def bad_sink(out):
        calls.append(out)
        raise RuntimeError("consumer gone")

    def good_sink(i):
        tokens = []

        def sink(delta):
            tokens.extend(delta.token_ids)
            if delta.finished:
                results[i] = tuple(tokens)
                if len(results) == 2:
                    done.set()
        return sink

    reqs = [EngineRequest(f"s{i}", engine.models[0], engine.tokenize(engine.models[0], q), p)
            for i, q in enumerate(prompts)]
    engine.local.submit(reqs, [bad_sink, good_sink(1), good_sink(2)])
    assert done.wait(timeout=120)
    assert [results[i] for i in (1, 2)] == [want[i].token_ids for i in (1, 2)]
    assert len(calls) == 1  # the failed sink is not called again; its request was aborted
    assert engine.alive and not engine.local.core.requests
    engine.check_integrity()


def test_final_only_requests_get_one_delta_with_every_token(engine):
    """EngineRequest.final_only: one delta when the request ends (what generate asks for
    when no stop string needs the text as it grows), with the tokens, logprobs and prompt
    logprobs a per-step request gets over all its deltas."""
    prompts = random_prompts(2, 4, 9, seed=21)
    p = SamplingParams(max_tokens=7, temperature=0.8, seed=5, ignore_eos=True, logprobs=2,
                       prompt_logprobs=1)
    got: dict[str, list] = {"once": [], "steps": []}
    done = threading.Event()

    def sink(kind):
        def put(delta):
            got[kind].append(delta)
            if sum(d.finished is not None and d.finish_reason is not None
                   for k in got for d in got[k]) == 2:
                done.set()
        return put

    name = engine.models[0]
    ids = engine.tokenize(name, prompts[0])
    engine.local.submit([EngineRequest("fo-once", name, ids, p, final_only=True),
                   EngineRequest("fo-steps", name, ids, p)], [sink("once"), sink("steps")])
    assert done.wait(timeout=120)
    [once], steps = got["once"], got["steps"]
    assert len(steps) == 7 and once.index == 0 and once.finish_reason == "length"
    assert once.token_ids == sum((d.token_ids for d in steps), ())
    want = sum((d.logprobs for d in steps), ())  # the rows share a batch: same up to fp32
    assert [(t, [i for i, _ in top]) for t, _, top in once.logprobs] == [
        (t, [i for i, _ in top]) for t, _, top in want]
    assert [lp for _, lp, _ in once.logprobs] == pytest.approx([lp for _, lp, _ in want],
                                                                abs=1e-5)
    assert once.prompt_logprobs == steps[0].prompt_logprobs is not None
    # the same accounting (the queue time is each request's own)
    assert replace(once.usage, queue_s=0.0) == replace(steps[-1].usage, queue_s=0.0)


def test_generate_asks_for_final_only_output_unless_stop_strings_need_the_text(engine,
                                                                               monkeypatch):
    seen = []
    submit = type(engine.local).submit

    def spy(self, requests, sinks):
        seen.extend(r.final_only for r in requests)
        return submit(self, requests, sinks)

    monkeypatch.setattr(type(engine.local), "submit", spy)
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    plain, stopped = engine.generate(["w1 w2", "w3 w4"], [p, SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True, stop=["zzz"])])
    assert seen == [True, False]
    assert len(plain.token_ids) == 3 and len(stopped.token_ids) == 3



def test_seeds_are_64_bit_signed_and_bad_ids_are_named(engine):
    """A seed outside int64 is refused (vLLM's range); out-of-vocabulary ids are reported by
    value, every one (8 shown), not only that some id is too large."""
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-(2**63))
    with pytest.raises(ValueError, match=r"seed must be a 64-bit signed integer"):
        SamplingParams(seed=2**63)
    vocab = engine.local.core.workers["m"].cfg.vocab_size
    prompt = [1, 2, 3]
    with pytest.raises(RequestError, match=rf"logit_bias .*got {vocab + 3}, {vocab + 7}$"):
        engine.generate(prompt, SamplingParams(logit_bias={5: 1.0, vocab + 7: 2.0,
                                                           vocab + 3: -1.0}))
    with pytest.raises(RequestError, match=rf"stop_token_ids .*got {vocab}, "
                                           rf"{vocab + 1}.* and 2 more$"):
        engine.generate(prompt, SamplingParams(stop_token_ids=list(range(vocab, vocab + 10))))
    with pytest.raises(RequestError, match=rf"prompt token ids .*got {vocab + 1}$"):
        engine.generate([1, vocab + 1, 2], SamplingParams(max_tokens=1))
