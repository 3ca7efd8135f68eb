"""The OpenAI routes against a fake engine client (tests/fake_engine.py): the HTTP layer
alone, its text side (stop strings, usage, streaming) and its mapping of engine errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpupool.api.server import build_state, create_app
from gpupool.config import ModelSpec, ServerConfig
from tests import TESTS_PACKAGE
from tests.fake_engine import FakeClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    fake = FakeClient(str(home), models={})
    config = ServerConfig(models=(ModelSpec("fake", "/fake"),), engine={"home": str(home)})
    state = build_state(config, fake)
    with TestClient(create_app(state)) as client:
        yield client, fake


def _post(client, path, **body):
    return client.post(path, json={"model": "fake", **body})


def _sse(r) -> list:
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_greedy_completion_counts_its_tokens(env):
    client, fake = env
    r = _post(client, "/v1/completions", prompt="ab", max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "cdefg"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    req = fake.requests[-1]
    assert req.prompt_token_ids == (97, 98) and req.params.max_tokens == 5


def test_a_stop_string_aborts_the_engine_request_and_counts_no_token_after_it(env):
    client, fake = env
    fake.step_seconds = 0.02  # the engine is still generating when the stop string shows
    try:
        r = _post(client, "/v1/completions", prompt="ab", max_tokens=40, temperature=0,
                  stop=["ef"])
    finally:
        fake.step_seconds = 0.001
    body = r.json()
    assert body["choices"][0]["text"] == "cd"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4  # c d e f: the token that completed "ef"
    rid = fake.requests[-1].request_id
    assert rid in fake.aborted  # the engine was told to stop

    r = _post(client, "/v1/completions", prompt="ab", max_tokens=40, temperature=0,
              stop=["ef"], include_stop_str_in_output=True)
    assert r.json()["choices"][0]["text"] == "cdef"


def test_a_stop_token_ends_the_output_in_the_engine(env):
    client, fake = env
    r = _post(client, "/v1/completions", prompt="ab", max_tokens=40, temperature=0,
              stop_token_ids=[ord("e")])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "cde"
    assert fake.requests[-1].request_id not in fake.aborted


def test_chat_stream_matches_the_whole_answer(env):
    client, fake = env
    whole = _post(client, "/v1/chat/completions", max_tokens=6, temperature=0,
                  messages=[{"role": "user", "content": "hi"}]).json()
    prompt = "user: hi\nassistant: "
    assert fake.requests[-1].prompt_token_ids == tuple(ord(c) for c in prompt)
    r = _post(client, "/v1/chat/completions", max_tokens=6, temperature=0, stream=True,
              stream_options={"include_usage": True},
              messages=[{"role": "user", "content": "hi"}])
    chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"] and len(text) == 6
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_n_choices_are_seeded_one_apart_and_unseeded_get_a_recorded_seed(env):
    client, fake = env
    r = _post(client, "/v1/completions", prompt="ab", max_tokens=8, n=2, seed=41)
    texts = [c["text"] for c in r.json()["choices"]]
    seeds = [q.params.seed for q in fake.requests[-2:]]
    assert seeds == [41, 42] and texts[0] != texts[1]
    again = _post(client, "/v1/completions", prompt="ab", max_tokens=8, n=2, seed=41).json()
    assert [c["text"] for c in again["choices"]] == texts
    _post(client, "/v1/completions", prompt="ab", max_tokens=2)
    assert isinstance(fake.requests[-1].params.seed, int)


def test_logprobs_reach_the_answer(env):
    client, _ = env
    r = _post(client, "/v1/completions", prompt="ab", max_tokens=3, temperature=0, logprobs=1)
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["c", "d", "e"] and lp["token_logprobs"] == [-0.5] * 3
    assert lp["text_offset"] == [0, 1, 2]


def test_errors_are_openai_errors(env):
    client, _ = env
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "ab"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(client, "/v1/completions", prompt="x" * 300)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(client, "/v1/completions", prompt="ab", max_tokens=255)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(client, "/v1/completions", prompt="ab\u00e9")  # outside the fake vocabulary
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(client, "/v1/completions", prompt=[1, 500])  # refused by the engine itself
    assert r.status_code == 400 and "[0, 128)" in r.json()["error"]["message"]


def test_the_api_with_a_fake_client_never_imports_torch(tmp_path):
    """In a fresh interpreter: the whole app over the fake client serves a completion, and
    neither torch nor transformers (nor the engine) is ever imported."""
    script = TESTS_PACKAGE + textwrap.dedent(f"""
        import json, sys
        from fastapi.testclient import TestClient
        from gpupool.api.server import build_state, create_app
        from gpupool.config import ModelSpec, ServerConfig
        from tests.fake_engine import FakeClient
        home = {str(tmp_path)!r}
        config = ServerConfig(models=(ModelSpec("fake", "/fake"),), engine={{"home": home}})
        state = build_state(config, FakeClient(home, models={{}}))
        with TestClient(create_app(state)) as c:
            r = c.post("/v1/chat/completions", json={{"model": "fake", "max_tokens": 3,
                       "messages": [{{"role": "user", "content": "hi"}}]}})
            assert r.status_code == 200, r.text
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                       ("torch", "transformers", "triton", "numpy", "safetensors")
                       or m.startswith(("gpupool.engine", "gpupool.models", "gpupool.llm")))
        print(json.dumps(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_finished_choices_are_counted_against_the_model_s_slos(env, monkeypatch):
    """gpupool_slo_requests_total{outcome}: met when the time to first token and the mean
    time per output token are within the model's SLOs (the dashboard's attainment)."""
    import dataclasses

    client, fake = env
    info = fake.model_info

    def counts() -> dict[str, float]:
        text = client.get("/metrics").text
        return {o: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("gpupool_slo_requests_total{")
                       and 'model="fake"' in line and f'outcome="{o}"' in line)
                for o in ("met", "missed")}

    before = counts()
    for ttft_ms, outcome in ((60_000.0, "met"), (1e-6, "missed")):
        monkeypatch.setattr(fake, "model_info", lambda name, t=ttft_ms: dataclasses.replace(
            info(name), ttft_ms=t, tbt_ms=60_000.0) if info(name) else None)
        r = _post(client, "/v1/completions", prompt="ab", max_tokens=3, n=2, temperature=0)
        assert r.status_code == 200, r.text
        after = counts()
        assert after[outcome] == before[outcome] + 2  # both choices
        before = after
    monkeypatch.setattr(fake, "model_info", lambda name: dataclasses.replace(
        info(name), ttft_ms=None, tbt_ms=None))  # a client that knows no SLOs counts none
    _post(client, "/v1/completions", prompt="ab", max_tokens=3, temperature=0)
    assert counts() == before


def test_a_stream_whose_client_left_before_its_first_byte_still_ends_its_run():
    """uvicorn's ASGI 2.3 scope makes Starlette listen for the disconnect: a client gone at
    once cancels the response before its generator starts, so the generator's clean-up never
    runs; the response itself aborts and counts the run (its tenant slot released: the soak
    test's tenant once kept a slot for ever)."""
    import asyncio

    from gpupool.api.routes_openai import RunStream

    class Run:
        done, aborted = False, 0

        def abort(self):
            self.aborted += 1

        def _count(self):
            self.done = True

    started = []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0.01)

    run = Run()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    asyncio.run(RunStream(body(), run)(scope, receive, send))
    assert not started  # the case: the generator never ran
    assert run.done and run.aborted == 1


def test_a_call_cancelled_while_its_tenant_limiter_admits_it_is_released():
    """The handler cancelled (its client gone) while the limiter's Redis round trip counts
    the call in a thread: the count is made all the same, so the call is released when it
    is (else its lease is renewed for ever: the soak test's tenant kept a slot so)."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from gpupool.api.routes_openai import Run

    class Limiter:
        def __init__(self):
            self.counting, self.go = threading.Event(), threading.Event()
            self.finished_ids = []

        def admit(self, tenant, call_id, limits, prompt_tokens):
            self.counting.set()
            self.go.wait(5)
            return None  # counted

        def finished(self, tenant, call_id, completion_tokens):
            self.finished_ids.append(call_id)

    limiter = Limiter()
    run = Run(SimpleNamespace(limiter=limiter), "m", SimpleNamespace(name="t", limits={}))

    async def scenario():
        task = asyncio.create_task(run._admit(3))
        await asyncio.to_thread(limiter.counting.wait, 5)
        task.cancel()
        await asyncio.sleep(0)
        limiter.go.set()  # the count is made after the cancel
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the admission was not cancelled")
        for _ in range(100):  # the release runs in a thread once the count is made
            if limiter.finished_ids:
                break
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert limiter.finished_ids == [run.call_id] and not run.counted


def test_a_release_still_queued_when_its_waiter_is_cancelled_runs_all_the_same():
    """A streamed answer waits for its call's release before its last byte; a client that
    leaves then cancels that wait. Under load the release is still queued for a thread, and
    a cancelled wait cancelled it too: the call held its tenant's slot, its lease renewed,
    for ever (the soak test's flake of sessions 23-25, "big" holding one call id)."""
    import asyncio
    import concurrent.futures
    import threading
    from types import SimpleNamespace

    from gpupool.api.routes_openai import Run

    class Limiter:
        def __init__(self):
            self.finished_ids = []

        def finished(self, tenant, call_id, completion_tokens):
            self.finished_ids.append(call_id)

    limiter, busy, go = Limiter(), threading.Event(), threading.Event()
    run = Run(SimpleNamespace(limiter=limiter), "m", SimpleNamespace(name="t", limits={}))
    run.counted = True

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        loop.run_in_executor(None, lambda: (busy.set(), go.wait(5)))  # the only thread busy
        while not busy.is_set():
            await asyncio.sleep(0.01)
        run._release(2)  # queued behind the busy thread
        waiter = asyncio.create_task(run.released())
        await asyncio.sleep(0.05)
        waiter.cancel()  # the client left
        await asyncio.sleep(0.05)
        go.set()
        for _ in range(100):
            if limiter.finished_ids:
                break
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert limiter.finished_ids == [run.call_id]
