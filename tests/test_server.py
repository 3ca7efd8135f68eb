"""``gpupool serve`` end to end with the official ``openai`` client: one server with SmolLM2,
a tiny model and two adapters of it (open: no tenants)."""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.factories import make_engine, make_peft_adapter, random_prompts
from tests.serving import Server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models, smollm2_path):
    base = tiny_models("llama")
    root = tmp_path_factory.mktemp("adapters")
    a1 = make_peft_adapter(base, root / "a1", 4, ["q_proj", "v_proj"], seed=1)
    a2 = make_peft_adapter(base, root / "a2", 8, ["o_proj", "down_proj"], seed=2)
    server = Server(tmp_path_factory.mktemp("home"),
                    "--model", f"smollm2={smollm2_path}", "--model", f"tiny={base}",
                    "--adapter", f"a1=tiny:{a1}", "--adapter", f"a2=tiny:{a2}",
                    "--max-queued-requests", "3")
    with server:
        yield {"server": server, "base": base, "a1": a1, "a2": a2, "smollm2": smollm2_path}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["server"].url + "/v1", api_key="unused", max_retries=0)


# a SmolLM2 stream that runs for many seconds on this CPU unless aborted
LONG_STREAM = {"model": "smollm2", "prompt": "Tell me a story.", "max_tokens": 2000,
               "ignore_eos": True, "temperature": 0, "stream": True}


def _post(served, path, body, **kw):
    return httpx.post(served["server"].url + path, json=body, timeout=60, **kw)


def test_open_server_says_so_and_lists_models_with_parents(served, client):
    server = served["server"]
    out = server.output()
    assert "the server is OPEN: no tenants yet" in out
    ready = re.search(r"ready in (\d+\.\d) s, listening on (\S+)", out)
    assert ready and ready.group(2) == server.url + "/v1" and float(ready.group(1)) > 0
    assert "models: smollm2, tiny" in out and "adapters: a1 (on tiny), a2 (on tiny)" in out
    assert "admin API: disabled" in out
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"smollm2", "tiny", "a1", "a2"}
    assert models["a1"].model_extra["parent"] == "tiny"
    assert models["tiny"].model_extra["parent"] is None


def test_chat_greedy_matches_engine_generate(served, client):
    from gpupool import Engine, SamplingParams

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                       temperature=0)
    engine = Engine(device="cpu", dtype="float32", kv_cache_bytes=64 << 20, weight_bytes=1 << 30)
    try:
        engine.add_model("smollm2", served["smollm2"])
        tok = engine.tokenizer("smollm2")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0),
                               model="smollm2")[0]
    finally:
        engine.shutdown()
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == len(ids) + len(want.token_ids)


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        full.usage.completion_tokens)


def test_base_and_two_adapters_concurrently_match_engine_generate(served):
    from gpupool import SamplingParams

    prompts = random_prompts(6, 3, 12, seed=5)
    names = ["tiny", "a1", "a2", "a1", "tiny", "a2"]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=served["server"].url + "/v1", api_key="x",
                                     max_retries=0)
        calls = [aclient.completions.create(model=n, prompt=p, max_tokens=12, temperature=0)
                 for n, p in zip(names, prompts)]
        out = []
        for i in range(0, len(calls), 3):  # the server's queue bound is 3
            out += await asyncio.gather(*calls[i:i + 3])
        return out

    got = asyncio.run(run())
    engine = make_engine(served["base"], name="tiny")
    try:
        engine.add_adapter("a1", "tiny", served["a1"])
        engine.add_adapter("a2", "tiny", served["a2"])
        want = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0),
                               model=names)
    finally:
        engine.shutdown()
    assert [r.choices[0].text for r in got] == [w.text for w in want]
    assert [r.usage.completion_tokens for r in got] == [len(w.token_ids) for w in want]
    assert len({r.choices[0].text for r in got}) > 2  # the adapters change the output


def test_completion_stream_stop_and_n(client):
    prompt = [5, 6, 7, 8]
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                     temperature=0)
    words = full.choices[0].text.split()
    stop = " " + words[3]
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    many = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                     n=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert {c.text for c in many.choices} == {full.choices[0].text}
    assert many.usage.prompt_tokens == len(prompt)
    assert many.usage.completion_tokens == 3 * full.usage.completion_tokens


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model="a2", prompt="w3 w4 w5", max_tokens=12,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_logprobs_are_log_probabilities_of_the_chosen_tokens(client):
    r = client.completions.create(model="tiny", prompt="w3 w4", max_tokens=5, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely
        assert top[tok] == pytest.approx(value)


def test_streamed_logprobs_add_up_to_the_whole(client):
    kw = dict(model="tiny", prompt="w3 w4", max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw)
             if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [v for p in parts for v in p.token_logprobs] == whole.token_logprobs
    assert [o for p in parts for o in p.text_offset] == whole.text_offset


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="smollm2", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Hi"}],
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "prompt": "w1", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "w1", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": "w1", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "w1", "n": 0}, "n"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": [1, "x"]}, "prompt"),
    ({"model": "tiny", "prompt": "w1", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "tiny", "prompt": "w1", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "tiny", "prompt": "w1", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": "tiny", "prompt": "w1", "stream_options": {"include_usage": True}},
     "stream_options"),
])
def test_bad_parameters_get_400_in_openai_format(served, body, param):
    r = _post(served, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_requests_that_could_break_the_engine_get_400_and_it_keeps_serving(served):
    url = served["server"].url
    for raw in (b'{"model": "tiny", "prompt": "w1", "temperature": NaN}',
                b'{"model": "tiny", "prompt": "w1", "top_p": Infinity}'):
        r = httpx.post(url + "/v1/completions", content=raw,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    r = _post(served, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3], "n": 2,
                                          "max_tokens": 3, "seed": 2**64 - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    depth = [l for l in httpx.get(url + "/metrics").text.splitlines()
             if l.startswith('gpupool_queue_depth{model="tiny"')]
    assert depth and all(l.endswith(" 0.0") for l in depth)  # nothing of it was queued
    tiny_t = _post(served, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3],
                                               "max_tokens": 4, "temperature": 1e-45})
    greedy = _post(served, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 3],
                                               "max_tokens": 4, "temperature": 0})
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == (
        greedy.json()["choices"][0]["text"])
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_malformed_json_unknown_model_long_prompt_and_big_body(served):
    r = httpx.post(served["server"].url + "/v1/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(served, "/v1/completions", {"model": "nope", "prompt": "w1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(served, "/v1/completions", {"model": "tiny", "prompt": [5] * 5000})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = _post(served, "/v1/chat/completions",
              {"model": "tiny", "messages": [{"role": "user", "content": "w1"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    r = _post(served, "/v1/completions", {"model": "tiny", "prompt": "w1 " * 3_000_000})
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.get(served["server"].url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_unknown_fields_are_ignored_with_one_log_line_per_name(served):
    for _ in range(3):
        r = _post(served, "/v1/completions", {"model": "tiny", "prompt": "w1 w2",
                                              "max_tokens": 2, "temperature": 0,
                                              "brand_new_option": {"x": 1}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert served["server"].output().count("ignoring unknown fields brand_new_option") == 1


def _pages_free(url) -> bool:
    for _ in range(100):
        text = httpx.get(url + "/metrics").text
        if 'gpupool_kv_pages{state="used",where="device"} 0.0' in text:
            return True
        time.sleep(0.05)
    return False


def test_queue_bound_gives_503_with_retry_after(served):
    body = LONG_STREAM
    url = served["server"].url + "/v1/completions"
    with httpx.Client(timeout=60) as c:
        streams = [c.stream("POST", url, json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        try:
            lines = [resp.iter_lines() for resp in responses]  # keep them open
            for resp, it in zip(responses, lines):  # all three are running
                assert resp.status_code == 200
                next(it)
            r = c.post(url, json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # disconnect mid-stream: aborts the requests
    assert _pages_free(served["server"].url)


def test_client_disconnect_aborts_and_frees_pages(served):
    url = served["server"].url
    body = LONG_STREAM
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                 json=body) as resp:
        lines = resp.iter_lines()
        next(lines)
        next(lines)
    for _ in range(100):  # the server notices the disconnect and aborts
        pool = httpx.get(url + "/metrics").text
        if 'gpupool_kv_pages{state="used",where="device"} 0.0' in pool:
            break
        time.sleep(0.05)
    assert 'gpupool_kv_pages{state="used",where="device"} 0.0' in pool
    assert 'status="aborted"' in pool
    # and it keeps serving
    assert _post(served, "/v1/completions", {"model": "tiny", "prompt": "w1",
                                             "max_tokens": 1}).status_code == 200


def test_disconnect_without_streaming_aborts_too(served):
    url = served["server"].url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**LONG_STREAM, "stream": False},
                   timeout=httpx.Timeout(60, read=1.0))
    assert _pages_free(url)
    running = [l for l in httpx.get(url + "/metrics").text.splitlines()
               if l.startswith("gpupool_queue_depth") and 'state="running"' in l]
    assert running and all(l.endswith(" 0.0") for l in running)


def test_a_client_leaving_mid_upload_is_one_quiet_log_line(served):
    """Headers promising 100 kB, 10 bytes, then the connection closed: no 500, no traceback
    in the log, one line saying the client left; the server goes on serving."""
    import socket

    server = served["server"]
    before = server.log.read_text()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                     b'{"model": ')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "client left" not in server.log.read_text()[len(before):]:
        assert time.monotonic() < deadline, server.log.read_text()[len(before):]
        time.sleep(0.05)
    new = server.log.read_text()[len(before):]
    assert "Traceback" not in new and " 500" not in new, new
    assert _post(served, "/v1/completions", {"model": "tiny", "prompt": "w1",
                                             "max_tokens": 1}).status_code == 200


def test_heavy_requests_neither_stall_a_running_stream_nor_pass_unbounded(served):
    """While a SmolLM2 stream runs: 20,000 bad_words are a 400 naming the field (they were
    tokenized on the event loop for seconds); 1,000 are served; a 3 MB /tokenize and a
    500,000-id /detokenize run off the loop. The stream's longest pause stays under 2 s
    (the issue's goal is 0.5 s, measured in benchmarks; CI machines are slower)."""
    import threading

    url = served["server"].url
    times: list[float] = []
    stop = threading.Event()

    def stream():
        body = {**LONG_STREAM, "max_tokens": 1000}
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions",
                                                     json=body) as resp:
            for _ in resp.iter_lines():
                times.append(time.monotonic())
                if stop.is_set():
                    return

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while len(times) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    words = [f"word{i}" for i in range(20_000)]
    r = _post(served, "/v1/completions", {"model": "smollm2", "prompt": "Hi",
                                          "max_tokens": 1, "bad_words": words})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
    r = _post(served, "/v1/completions", {"model": "smollm2", "prompt": "Hi",
                                          "max_tokens": 1, "bad_words": words[:1000]})
    assert r.status_code == 200, r.text
    r = _post(served, "/tokenize", {"model": "smollm2", "prompt": "hello world " * 250_000})
    assert r.status_code == 200 and r.json()["count"] > 100_000
    r = _post(served, "/detokenize", {"model": "smollm2",
                                      "tokens": [i % 40_000 for i in range(500_000)]})
    assert r.status_code == 200, r.text
    end = time.monotonic()
    stop.set()
    t.join(timeout=60)
    window = [x for x in times if start <= x <= end]
    gaps = [b - a for a, b in zip([start, *window], [*window, end])]
    assert max(gaps) < 2.0, (max(gaps), len(window))


def test_health_and_metrics(served):
    url = served["server"].url
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no model names
    text = httpx.get(url + "/metrics").text
    for name in ("gpupool_requests_total", "gpupool_generation_tokens_total",
                 "gpupool_time_to_first_token_seconds_bucket",
                 "gpupool_time_between_tokens_seconds_bucket", "gpupool_queue_depth",
                 "gpupool_swaps_total", "gpupool_swap_bytes_total", "gpupool_kv_pages",
                 "gpupool_arena_bytes", 'gpupool_weight_prefetches_total{outcome="used"}'):
        assert name in text, name
    line = next(l for l in text.splitlines()
                if l.startswith('gpupool_generation_tokens_total{model="tiny"'))
    assert float(line.split()[-1]) > 0


def test_admin_api_is_disabled_without_an_admin_key(served):
    r = httpx.get(served["server"].url + "/admin/pool", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    assert json.loads(r.text)["error"]["type"] == "permission_error"


def test_chat_prompt_logprobs_sit_at_the_top_level_with_ranks(served):
    """vLLM's chat response: prompt_logprobs at the top level (null when not asked; not in
    the choices), each prompt token with its rank in the vocabulary even outside the top
    alternatives asked for."""
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 2, "temperature": 0}
    r = _post(served, "/v1/chat/completions", chat)
    assert r.status_code == 200 and r.json()["prompt_logprobs"] is None, r.text
    assert "prompt_logprobs" not in r.json()["choices"][0]
    r = _post(served, "/v1/chat/completions", {**chat, "prompt_logprobs": 1})
    plp = r.json()["prompt_logprobs"]
    assert r.status_code == 200 and plp[0] is None and all(1 <= len(d) <= 2 for d in plp[1:])
    ranks = [v["rank"] for d in plp[1:] for v in d.values()]
    assert all(isinstance(k, int) and k >= 1 for k in ranks)
    assert max(ranks) > 2  # prompt tokens outside the top alternative have their rank


def test_chat_template_options_prefill_the_answer(served):
    """vLLM's continue_final_message / add_generation_prompt / chat_template_kwargs on the chat
    route and /tokenize (which also takes tools and return_token_strs): the prefilled answer
    is the prompt's end, left open; contradictions and reserved template arguments are 400s."""
    msgs = [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "The colour is"}]
    prefill = {"add_generation_prompt": False, "continue_final_message": True}
    r = _post(served, "/tokenize", {"model": "smollm2", "messages": msgs, **prefill,
                                    "return_token_strs": True})
    assert r.status_code == 200, r.text
    tok = r.json()
    assert len(tok["token_strs"]) == tok["count"] == len(tok["tokens"])
    d = _post(served, "/detokenize", {"model": "smollm2", "tokens": tok["tokens"]}).json()
    assert d["prompt"].endswith("The colour is")  # open: no end-of-turn after it
    gen = _post(served, "/tokenize", {"model": "smollm2", "messages": msgs[:1]}).json()
    bare = _post(served, "/tokenize", {"model": "smollm2", "messages": msgs[:1],
                                       "add_generation_prompt": False}).json()
    assert bare["count"] < gen["count"]  # the assistant header only with the prompt
    chat = {"model": "smollm2", "messages": msgs, "max_tokens": 3, "temperature": 0}
    r = _post(served, "/v1/chat/completions", {**chat, **prefill,
                                               "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == tok["count"], r.text
    r = _post(served, "/v1/chat/completions", {**chat, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    r = _post(served, "/v1/chat/completions", {**chat, "chat_template_kwargs": {"tokenize": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
