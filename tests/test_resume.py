"""Resuming a request from the tokens it already delivered: with counter-based sampling (token
i drawn with randomness keyed by (seed, i)) the rest is exactly what the uninterrupted request
would have generated, sampled or greedy, alone or in a batch of mixed adapters."""

import threading

import pytest

from gpupool import SamplingParams
from gpupool.messages.codec import from_wire, to_wire
from gpupool.messages.types import EngineRequest
from tests.factories import make_engine, make_peft_adapter, random_prompts

N, K = 12, 5  # tokens in all; delivered before the resume


def _run(engine, requests: list[EngineRequest]) -> dict[str, list[int]]:
    """Every request's new output tokens (after its delivered ones), all submitted at once."""
    tokens = {r.request_id: [] for r in requests}
    first = {}
    done = threading.Event()
    finished = set()
    lock = threading.Lock()

    def sink_for(rid):
        def sink(delta):
            with lock:
                if not tokens[rid]:
                    first.setdefault(rid, delta.index)
                tokens[rid].extend(delta.token_ids)
                if delta.finished:
                    assert delta.error is None, delta.error
                    finished.add(rid)
                    if len(finished) == len(requests):
                        done.set()
        return sink

    engine.local.submit(requests, [sink_for(r.request_id) for r in requests])
    assert done.wait(timeout=120)
    for r in requests:  # a resumed request's first new token has index K
        assert first[r.request_id] == len(r.delivered_token_ids)
    return tokens


@pytest.fixture(scope="module")
def lora_engine(tiny_models, tmp_path_factory):
    base = tiny_models("llama")
    root = tmp_path_factory.mktemp("resume-adapters")
    engine = make_engine(base, name="base", max_lora_rank=8)
    for i, (name, rank) in enumerate((("a4", 4), ("a8", 8))):
        engine.add_adapter(name, "base", make_peft_adapter(base, root / name, rank,
                                                           ["q_proj", "v_proj"], seed=i))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("temperature", [0.8, 0.0], ids=["sampled", "greedy"])
def test_a_resumed_request_generates_what_the_uninterrupted_one_did(lora_engine, temperature):
    prompt = random_prompts(1, 6, 6, seed=5)[0]
    params = SamplingParams(max_tokens=N, temperature=temperature, seed=1234, ignore_eos=True)
    whole = _run(lora_engine, [EngineRequest("w", "base", prompt, params)])["w"]
    assert len(whole) == N
    resumed = EngineRequest("r", "base", prompt, params, delivered_token_ids=whole[:K])
    resumed = from_wire(to_wire(resumed))  # as it would cross a wire to another engine
    assert _run(lora_engine, [resumed])["r"] == whole[K:]
    if temperature:  # the seed matters: another one samples something else
        other = SamplingParams(max_tokens=N, temperature=temperature, seed=99, ignore_eos=True)
        assert _run(lora_engine, [EngineRequest("o", "base", prompt, other)])["o"] != whole


def test_resumed_requests_in_a_batch_of_mixed_adapters(lora_engine):
    names = ["base", "a4", "a8", "a4", "base", "a8"]
    prompts = random_prompts(len(names), 3, 15, seed=8)
    params = [SamplingParams(max_tokens=N, temperature=0.8 if i % 3 else 0.0, seed=77 + i,
                             ignore_eos=True) for i in range(len(names))]
    whole = _run(lora_engine, [EngineRequest(f"w{i}", n, p, q)
                               for i, (n, p, q) in enumerate(zip(names, prompts, params))])
    # adapters change what is sampled (the test could fail if they were ignored)
    alone = _run(lora_engine, [EngineRequest("b1", "base", prompts[1], params[1])])["b1"]
    assert alone != whole["w1"]
    resumed = [EngineRequest(f"r{i}", n, p, q, delivered_token_ids=whole[f"w{i}"][:K + i % 3])
               for i, (n, p, q) in enumerate(zip(names, prompts, params))]
    got = _run(lora_engine, resumed)
    for i in range(len(names)):
        assert got[f"r{i}"] == whole[f"w{i}"][K + i % 3:], names[i]
    lora_engine.check_integrity()


def test_an_unseeded_request_records_its_seed():
    a = EngineRequest("a", "m", [1, 2], SamplingParams(temperature=1.0))
    b = EngineRequest("b", "m", [1, 2], SamplingParams(temperature=1.0))
    assert isinstance(a.params.seed, int) and a.params.seed != b.params.seed
    assert from_wire(to_wire(a)).params.seed == a.params.seed


def test_messages_cross_a_wire_as_json():
    import json

    from gpupool.messages.types import AddModel, OutputDelta, Stats, Usage

    msgs = [
        EngineRequest("r", "m", [1, 2], SamplingParams(stop=["x"], seed=3, logprobs=2),
                      tenant="t", delivered_token_ids=[4]),
        EngineRequest("s", "m", [1], SamplingParams(logit_bias={"5": 2.0}, seed=1,
                                                    frequency_penalty=0.5),
                      cache_salt="tenant:t"),
        OutputDelta("r", 1, (5, 6), ((5, -0.5, ((5, -0.5), (7, -2.0))), (6, -1.0, ())),
                    "stop", 6, Usage(2, 3, 1), cached_tokens=1),
        AddModel("m", "/p", 100.0, None, "bfloat16", "int8"),
        Stats("cpu", "token", {"kv": {"bytes": 1}}, {}, {}, ("m",),
              {"type": {"resident_adapters": ["a"]}}, {"a": "type"}, 1),
    ]
    for m in msgs:
        assert from_wire(json.loads(json.dumps(to_wire(m)))) == m
    with pytest.raises(ValueError):
        from_wire({"type": "EngineRequest", "request_id": "r", "surprise": 1})
