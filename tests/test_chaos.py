"""The pool survives its own coordinator: a real redis-server, a gateway and two workers (fp32
tiny Llama, heartbeats every 0.1 s with a 0.6 s TTL), and the faults of a bad day: Redis
stalled 7 s (SIGSTOP), Redis restarted from its append-only file, a worker paused past its
TTL, a gateway killed while it holds a tenant's limited requests, a step longer than the TTL.
Every stream completes with the uninterrupted text and no error; a paused worker's requests
are fenced (what it writes after the move is dropped, counted); limit entries are freed within
a lease; inboxes hold only what is unfinished."""

import threading
import time

import httpx
import pytest

from gpupool import SamplingParams
from tests.cluster import ADMIN, Cluster
from tests.factories import make_engine, make_tiny_model, random_prompts

openai = pytest.importorskip("openai")

LEASE_S = 2.0  # the limit leases of this module's gateways (GPUPOOL_LIMIT_LEASE_S)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    llama = make_tiny_model(root / "llama", "llama")
    c = Cluster(root, tmp_path_factory.mktemp("chaos"))
    try:
        c.start_worker("w1")
        c.start_worker("w2")
        gw = c.gateway("--model", f"llama={llama}",
                       env={"GPUPOOL_LIMIT_LEASE_S": str(LEASE_S)})
        try:
            yield c, gw, llama, {}
        finally:
            gw.stop()
    finally:
        c.close()


def _want(llama, prompts, max_tokens):
    e = make_engine(llama, name="llama")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [o.text for o in e.generate(prompts, params)]
    finally:
        e.shutdown()


def _client(gw, key="unused"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _stream(client, prompt, max_tokens, sink):
    try:
        s = client.completions.create(model="llama", prompt=prompt, max_tokens=max_tokens,
                                      temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        for chunk in s:
            ch = chunk.choices[0]
            sink.append((ch.text, ch.finish_reason))
    except Exception as e:  # an error event or a truncated body: the test says which
        sink.append((None, repr(e)))


def _run_through(c, gw, llama, fault, n=4, max_tokens=150, seed=0, key="unused",
                 killed=()):
    """n greedy streams; ``fault()`` once each has a few tokens; every stream must end
    with the uninterrupted text, and every worker but ``killed`` is still running."""
    prompts = random_prompts(n, 4, 10, seed=seed)
    want = _want(llama, prompts, max_tokens)
    sinks = [[] for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(_client(gw, key), p, max_tokens, s))
               for p, s in zip(prompts, sinks)]
    for t in threads:
        t.start()
    _wait(lambda: all(len(s) >= 2 for s in sinks), 60)
    assert not any(t is None for s in sinks for t, _ in s), sinks
    fault()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i, s in enumerate(sinks):
        errors = [r for t, r in s if t is None]
        assert not errors, (i, errors)
        assert "".join(t for t, _ in s) == want[i], i
        assert s[-1][1] == "length", (i, s[-1])
    running = [w for w in c.workers if w not in killed]
    assert all(c.workers[w].poll() is None for w in running)  # no worker died of it
    _wait(lambda: all(c.r.xlen(f"gpupool:cluster:in:{w}") == 0 for w in running),
          10)  # inboxes trimmed


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _counter(c, name):
    return int(c.r.get(f"gpupool:cluster:{name}") or 0)


def test_a_redis_stall_of_7_s_is_a_pause(chaos):
    """Through the module's gateway (outage limit 30 s) every stream pauses and resumes;
    through one whose limit is 2 s, the same stall ends its stream with an error event and
    [DONE] (not a truncated body)."""
    c, gw, llama, _ = chaos
    moved = _counter(c, "redispatched")
    short = c.gateway("--outage-limit-s", "2")
    lines: list[str] = []

    def short_stream():
        body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 240, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=120) as h, h.stream("POST", short.url + "/v1/completions",
                                                      json=body) as resp:
            lines.extend(line for line in resp.iter_lines() if line)

    def stall():
        t = threading.Thread(target=short_stream)
        t.start()
        _wait(lambda: len(lines) >= 2, 30)
        c.pause_redis(7.0)
        t.join(timeout=60)

    try:
        _run_through(c, gw, llama, stall, seed=1)
    finally:
        short.stop()
    assert _counter(c, "redispatched") == moved  # no worker was taken for dead
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert "unavailable for more than 2 s" in lines[-2], lines[-3:]


def test_a_redis_restart_from_its_log_is_a_pause(chaos):
    c, gw, llama, _ = chaos
    moved = _counter(c, "redispatched")
    _run_through(c, gw, llama, lambda: c.restart_redis(down_s=1.7), seed=2)
    assert _counter(c, "redispatched") == moved


def test_a_paused_worker_is_fenced(chaos):
    """SIGSTOP a worker past its TTL: its streams move to the other and end with the
    uninterrupted text; when it wakes up it stops them (their fence), and what it still
    wrote is dropped by the gateway (counted), never shown."""
    import signal

    c, gw, llama, _ = chaos
    moved, fenced = _counter(c, "redispatched"), _counter(c, "fenced")

    def pause():
        c.workers["w1"].send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        c.workers["w1"].send_signal(signal.SIGCONT)

    _run_through(c, gw, llama, pause, max_tokens=240, seed=3)
    assert _counter(c, "redispatched") > moved  # w1's streams were moved
    log = (c.home / "w1.log").read_text()
    _wait(lambda: "was moved to another worker" in (c.home / "w1.log").read_text(), 10)
    assert _counter(c, "fenced") >= fenced  # dropped deltas are counted, none shown
    assert "Traceback" not in log
    pool = httpx.get(gw.url + "/admin/pool", headers=ADMIN)
    assert pool.status_code == 200  # w1 back: alive again
    _wait(lambda: {w["name"]: w["alive"] for w in httpx.get(
        gw.url + "/admin/pool", headers=ADMIN).json()["workers"]}.get("w1"), 10)


def test_a_killed_gateway_frees_its_tenants_slots_within_a_lease(chaos):
    c, gw, llama, state = chaos
    r = httpx.post(gw.url + "/admin/tenants", headers=ADMIN,
                   json={"name": "acme", "models": ["*"],
                         "limits": {"max_concurrent_requests": 2}})
    assert r.status_code == 201, r.text
    key = state["key"] = r.json()["api_key"]
    gw2 = c.gateway(env={"GPUPOOL_LIMIT_LEASE_S": str(LEASE_S)})
    sinks = [[], []]
    threads = [threading.Thread(target=_stream, args=(_client(gw2, key), [5, 6, 7], 240, s),
                                daemon=True) for s in sinks]
    for t in threads:
        t.start()
    _wait(lambda: all(sinks), 60)
    busy = httpx.post(gw.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "llama", "prompt": [5], "max_tokens": 1})
    assert busy.status_code == 429  # both slots held by gw2's calls
    import signal

    gw2.proc.send_signal(signal.SIGKILL)
    gw2.proc.wait()
    killed = time.monotonic()

    def admitted():
        r = httpx.post(gw.url + "/v1/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "llama", "prompt": [5], "max_tokens": 1})
        assert r.status_code in (200, 429), r.text
        return r.status_code == 200

    _wait(admitted, 3 * LEASE_S)
    assert time.monotonic() - killed <= 3 * LEASE_S


def test_a_step_longer_than_the_ttl_is_not_a_dead_worker(chaos):
    """A worker whose prefill steps take 1.5 s (a test hook; TTL 0.6 s) keeps its heartbeat
    (read from the engine's snapshot, not under the step's lock): its requests are not moved,
    and /admin/pool lists the killed workers as dead, not a 500."""
    import signal

    c, gw, llama, state = chaos
    c.start_worker("w3", env={"GPUPOOL_TEST_SLOW_PREFILL_S": "1.5"})
    for name in ("w1", "w2"):
        c.workers[name].send_signal(signal.SIGKILL)
        c.workers[name].wait()
    moved = _counter(c, "redispatched")
    key = state.get("key", "unused")
    _run_through(c, gw, llama, lambda: None, n=2, max_tokens=40, seed=4, key=key,
                 killed=("w1", "w2"))
    assert _counter(c, "redispatched") == moved
    r = httpx.get(gw.url + "/admin/pool", headers=ADMIN)
    assert r.status_code == 200, r.text
    alive = {w["name"]: w["alive"] for w in r.json()["workers"]}
    assert alive.get("w3") is True and not alive.get("w1") and not alive.get("w2")
