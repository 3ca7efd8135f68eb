"""``gpupool worker``: one engine (one device) serving a cluster through Redis.

Threads: the reader takes messages from the worker's inbox stream (consumer group
``engine``) and hands requests to the engine (loading a registered model or adapter on first
use, its path re-checked against this worker's own ``--model-root``); the engine thread steps;
the writer puts each request's deltas on its output stream and acknowledges and deletes the
request's inbox entry when it ends; the heartbeat publishes what the worker holds every
``heartbeat_s`` with a TTL, from the engine's snapshot (never waiting for a step). SIGTERM
drains: the heartbeat says so (routers send nothing new), running requests finish within
``grace_s``, then it exits.

Redis may stall or restart: every thread retries with backoff and jitter for as long as it
takes, the engine goes on, and the writer keeps the deltas in order until they are written
(the gateway drops repeats by token index). Each placement of a request carries an epoch;
when a gateway moves a request away (it took this worker for dead) it raises the request's
fence, and the worker aborts it and writes nothing more for it.

``GPUPOOL_TEST_SLOW_PREFILL_S`` (tests only) makes every step that admits a new prompt that
many seconds longer, holding the engine lock as a long prefill does.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from pathlib import Path

import redis

from gpupool.cluster import conn, keys
from gpupool.cluster.registry import WorkerInfo
from gpupool.default_model import DEFAULT_MODEL
from gpupool.engine.local import LocalEngine
from gpupool.messages.codec import from_wire, to_wire
from gpupool.messages.errors import EngineError, ModelLoadError, RequestError
from gpupool.messages.types import (
    Abort,
    AddAdapter,
    EngineRequest,
    OutputDelta,
    RemoveAdapter,
    RemoveModel,
    Usage,
)
from gpupool.models.sizes import element_bytes

logger = logging.getLogger("gpupool.worker")


class Worker:
    def __init__(self, url: str, name: str, engine: LocalEngine, model_roots=(),
                 heartbeat_s: float = 0.5, ttl_s: float = 3.0, grace_s: float = 30.0):
        self.name, self.engine = name, engine
        self.r = conn.client(url, client_name=keys.client_name(name))
        self.r.ping()
        self.roots = [Path(p).expanduser().resolve() for p in model_roots]
        self.heartbeat_s, self.ttl_s, self.grace_s = heartbeat_s, ttl_s, grace_s
        self.inbox = keys.inbox(name)
        self.out: queue.Queue = queue.Queue()
        # request id -> (its inbox entry, acknowledged and deleted at its end; its placement)
        self.entries: dict[str, tuple[bytes, int]] = {}
        self.fenced: set[str] = set()  # moved away by a gateway: nothing more is written
        self.outage = conn.Outage(limit_s=float("inf"))  # a worker waits for Redis forever
        slow = float(os.environ.get("GPUPOOL_TEST_SLOW_PREFILL_S") or 0)
        if slow > 0:
            self._slow_prefill(slow)
        self.stopping = threading.Event()
        self.draining = threading.Event()
        self._deadline: float | None = None  # when a drain gives up on running requests

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.r.xgroup_create(self.inbox, keys.GROUP, id="$", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._heartbeat()
        threads = [threading.Thread(target=self._beat_loop, name="gpupool-heartbeat",
                                    daemon=True),
                   threading.Thread(target=self._write_loop, name="gpupool-writer",
                                    daemon=True)]
        for t in threads:
            t.start()
        logger.info("worker %s on %s: reading %s", self.name, self.engine.device, self.inbox)
        try:
            while not self.stopping.is_set() and not self._drained():
                try:
                    self._read_once()
                    self.outage.ok()
                except redis.RedisError as e:  # a stall or a restart: what is held goes on
                    self._redis_failed("reading the inbox", e)
        finally:
            self.stopping.set()
            for t in threads:
                t.join(timeout=5)
            self._leave()
            self.engine.shutdown()

    def _redis_failed(self, what: str, e: Exception) -> None:
        """Log the first failure of an outage, then wait (backoff with jitter, at most 1 s)."""
        wait = self.outage.failed()
        if self.outage.tries == 1:
            logger.warning("worker %s: Redis unavailable while %s (%s); retrying", self.name,
                           what, conn.redact(e))
        time.sleep(wait)

    def _slow_prefill(self, seconds: float) -> None:
        core, step = self.engine.core, self.engine.core.step

        def slow_step():
            if any(core.scheduler.waiting.values()):
                time.sleep(seconds)
            return step()

        core.step = slow_step

    def _drained(self) -> bool:
        """Draining and done (or out of grace time); while draining nothing new is read."""
        if not self.draining.is_set():
            return False
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace_s
        if not self.engine.num_unfinished() or time.monotonic() > self._deadline:
            return True
        time.sleep(0.05)
        return False

    def _read_once(self) -> None:
        if self.draining.is_set():
            return
        try:
            got = self.r.xreadgroup(keys.GROUP, self.name, {self.inbox: ">"}, count=64,
                                    block=100)
        except redis.ResponseError as e:  # taken for dead and forgotten: join again
            if "NOGROUP" not in str(e):
                raise
            logger.warning("worker %s: inbox gone (taken for dead); joining again", self.name)
            self.r.xgroup_create(self.inbox, keys.GROUP, id="$", mkstream=True)
            self._heartbeat()
            return
        for _, entries in got or ():
            for entry_id, fields in entries:
                self._handle(entry_id, fields)

    def drain(self, *_) -> None:
        """Take no new work; finish what is held (within ``grace_s``), then stop."""
        logger.info("worker %s draining", self.name)
        self.draining.set()

    def _leave(self) -> None:
        try:
            pipe = self.r.pipeline()
            pipe.srem(keys.WORKERS, self.name)
            pipe.delete(keys.worker_key(self.name))
            pipe.execute()
        except redis.RedisError:
            pass

    # ---- messages ----------------------------------------------------------------------------
    def _handle(self, entry_id: bytes, fields: dict) -> None:
        try:
            msg = from_wire(json.loads(fields[b"msg"]))
            epoch = int(fields.get(b"epoch", 0))
        except (KeyError, ValueError, TypeError) as e:
            logger.error("unreadable message %s: %s", entry_id, e)
            self._consumed(entry_id)
            return
        if isinstance(msg, EngineRequest):
            held = self.entries.get(msg.request_id)
            if held is not None and held[1] >= epoch:  # sent again (a retried XADD)
                self._consumed(entry_id)
                return
            self._start(entry_id, msg, epoch)
            return
        try:
            if isinstance(msg, Abort):
                self.engine.abort(msg.request_id)
            elif isinstance(msg, RemoveModel) and msg.name in self.engine.models:
                self.engine.remove_model(msg.name)
            elif isinstance(msg, RemoveAdapter) and msg.name in self.engine.adapters:
                self.engine.remove_adapter(msg.name)
            elif (isinstance(msg, AddAdapter) and msg.replace
                  and msg.name in self.engine.adapters):  # others load the new spec on use
                self.engine.add_adapter(msg.name, msg.base, self._allowed(msg.path),
                                        replace=True)
        except (EngineError, OSError) as e:
            logger.warning("%s: %s", type(msg).__name__, e)
        self._consumed(entry_id)

    def _consumed(self, entry_id: bytes) -> None:
        """Acknowledge an inbox entry and delete it (inboxes do not grow for ever)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(self.inbox, keys.GROUP, entry_id)
        pipe.xdel(self.inbox, entry_id)
        pipe.execute()

    def _start(self, entry_id: bytes, req: EngineRequest, epoch: int = 0) -> None:
        rid = req.request_id
        self.entries[rid] = (entry_id, epoch)
        self.fenced.discard(rid)
        try:
            self._ensure(req.model)
            self.engine.submit([req], [lambda d: self.out.put(d)])
        except (EngineError, OSError) as e:
            self.out.put(OutputDelta(rid, len(req.delivered_token_ids), finish_reason="abort",
                                     error=str(e), usage=Usage(len(req.prompt_token_ids),
                                                               len(req.delivered_token_ids))))

    def _ensure(self, name: str) -> None:
        """Load ``name`` (and its base) if the cluster registers it and this worker has not."""
        if self.engine.model_info(name) is not None:
            return
        models = {k.decode(): json.loads(v) for k, v in self.r.hgetall(keys.MODELS).items()}
        adapters = {k.decode(): json.loads(v)
                    for k, v in self.r.hgetall(keys.ADAPTERS).items()}
        if name in adapters:
            spec = adapters[name]
            self._ensure(spec["base"])
            self.engine.add_adapter(name, spec["base"], self._allowed(spec["path"]))
        elif name in models:
            spec = models[name]
            self.engine.add_model(name, self._allowed(spec["path"]),
                                  self.engine.slo(spec.get("ttft_ms"), spec.get("tbt_ms")),
                                  spec.get("dtype"), spec.get("quantization"))
            logger.info("worker %s loaded %s from %s", self.name, name, spec["path"])
        else:
            raise RequestError(f"model {name!r} is not registered in the cluster")

    def _allowed(self, path: str) -> str:
        """``path`` if it resolves under one of this worker's model roots (whoever can write
        to Redis must not make a worker read any file it likes)."""
        if path == DEFAULT_MODEL:
            return path
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise ModelLoadError(f"{path}: outside this worker's --model-root"
                                 if self.roots else
                                 f"{path}: this worker has no --model-root to load from")
        return str(resolved)

    # ---- the writer and the heartbeat --------------------------------------------------------
    def _write_loop(self) -> None:
        while not (self.stopping.is_set() and self.out.empty()):
            try:
                items = [self.out.get(timeout=0.1)]
            except queue.Empty:
                continue
            while True:
                try:
                    items.append(self.out.get_nowait())
                except queue.Empty:
                    break
            while True:  # until written: Redis may be away for a while
                try:
                    self._write(items)
                    self.outage.ok()
                    break
                except redis.RedisError as e:  # nothing lost: the same deltas, in order
                    self._redis_failed(f"writing {len(items)} deltas", e)

    def _write(self, items: list[OutputDelta]) -> None:
        """One pipeline: each delta on its request's output stream with the placement's
        epoch; the inbox entry of a request that ended acknowledged and deleted. A repeat
        after a failed try is harmless (the gateway drops tokens it has by index)."""
        pipe = self.r.pipeline(transaction=False)
        ended = []
        for d in items:
            entry, epoch = self.entries.get(d.request_id, (None, 0))
            if d.finished:
                ended.append(d.request_id)
                if entry is not None:
                    pipe.xack(self.inbox, keys.GROUP, entry)
                    pipe.xdel(self.inbox, entry)
            if d.request_id in self.fenced:  # moved away: the gateway reads another placement
                continue
            key = keys.outbox(d.request_id)
            pipe.xadd(key, {"msg": json.dumps(to_wire(d)), "epoch": epoch},
                      maxlen=keys.OUT_MAXLEN, approximate=True)
            pipe.expire(key, keys.OUT_TTL_S)
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, redis.ConnectionError):
                raise result
            if isinstance(result, redis.RedisError):  # e.g. an inbox a gateway deleted
                logger.debug("worker %s: %s", self.name, result)
        for rid in ended:
            self.entries.pop(rid, None)
            self.fenced.discard(rid)

    def _beat_loop(self) -> None:
        beats = 0
        while not self.stopping.wait(self.heartbeat_s):
            tp = self.engine.tp
            if tp is not None and not tp.alive():
                # a tensor-parallel rank died: the group is down; this process exits, so its
                # Redis connections close, the cluster sees the worker dead and its requests
                # move (cluster/client.py: to a worker of the same degree)
                logger.error("worker %s: a tensor-parallel rank died; exiting", self.name)
                for p in tp.procs:
                    p.kill()
                os._exit(70)
            try:
                self._heartbeat()
                self._check_fences()
                beats += 1
                if beats * self.heartbeat_s >= 1.0:  # about once a second
                    beats = 0
                    self._abort_unread()
                self.outage.ok()
            except redis.RedisError as e:
                self._redis_failed("publishing its heartbeat", e)

    def _check_fences(self) -> None:
        """Abort the requests a gateway moved to another worker (their fence is above this
        placement's epoch); the writer drops what they still send."""
        held = list(self.entries.items())
        if not held:
            return
        fences = self.r.mget([keys.fence(rid) for rid, _ in held])
        for (rid, (_, epoch)), fence in zip(held, fences):
            if fence is not None and int(fence) > epoch and rid not in self.fenced:
                logger.warning("request %s was moved to another worker (placement %d, this "
                               "one's %d); aborting it here", rid, int(fence), epoch)
                self.fenced.add(rid)
                self.engine.abort(rid)

    def _abort_unread(self) -> None:
        """Abort requests whose gateway stopped reading them (it died): nobody would see
        their tokens. Not within a reader lease of a Redis outage: the leases expired while
        no gateway could renew them."""
        rids = list(self.entries)
        if not rids or self.outage.recent(keys.READER_TTL_S):
            return
        alive = self.r.exists(*[keys.reader(rid) for rid in rids]) == len(rids)
        if alive:
            return
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(keys.reader(rid))
        for rid, read in zip(rids, pipe.execute()):
            if not read:
                logger.info("request %s: no reader any more; aborting it", rid)
                self.engine.abort(rid)

    def _heartbeat(self) -> None:
        s = self.engine.snapshot()  # never waits for a step
        if not s:
            return
        loaded = list(s["models"])
        info = WorkerInfo(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), device=s["device"],
            weight_bytes=s["arena"]["weights"]["bytes"],
            element_bytes=element_bytes(self.engine.config.dtype, s["device"]),
            kv_pages_total=s["kv_pages"]["total"],
            kv_pages_free=s["kv_pages"]["free"], resident=list(s["resident_models"]),
            cached=[m for m in loaded if m not in s["resident_models"]], models=loaded,
            running=sum(m["running"] for m in s["models"].values()),
            queued=sum(m["waiting"] for m in s["models"].values()),
            draining=self.draining.is_set(), at=time.time(), step_s=s["step_s"],
            ttl_s=self.ttl_s, tensor_parallel=self.engine.config.tensor_parallel,
            kv_capacity={m: v["kv_capacity_tokens"] for m, v in s["models"].items()},
            adapters=sorted({a for v in s["models"].values() for a in v["resident_adapters"]}),
            host_adapters=sorted({a for v in s["models"].values()
                                  for a in v["host_adapters"]}))
        pipe = self.r.pipeline()
        pipe.set(keys.worker_key(self.name), info.to_json(), px=int(self.ttl_s * 1000))
        pipe.sadd(keys.WORKERS, self.name)
        pipe.execute()


class _LiveStats:
    """What the pool collector reads: the engine's stats at scrape time."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    @property
    def pool_stats(self) -> dict:
        return self.engine.stats()


def serve_metrics(engine: LocalEngine, port: int, key: str | None, host: str = "0.0.0.0"):
    """The engine's pool metrics (Prometheus text) on ``http://host:port/metrics``; with
    ``key``, a request needs ``Authorization: Bearer <key>`` (the rule of ``gpupool serve``'s
    /metrics once tenants exist). Returns the server (its thread is a daemon)."""
    import hmac
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from gpupool.api.metrics import _PoolCollector

    registry = CollectorRegistry()
    registry.register(_PoolCollector(_LiveStats(engine)))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if key and not hmac.compare_digest(given.encode(), key.encode()):
                self.send_error(401, "metrics need the worker's --metrics-key")
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="gpupool-metrics", daemon=True).start()
    return server


def run_worker(url: str, name: str | None, config, model_roots=(), heartbeat_s: float = 0.5,
               ttl_s: float = 3.0, grace_s: float = 30.0, metrics_port: int | None = None,
               metrics_key: str | None = None, metrics_host: str = "0.0.0.0") -> None:
    """Build the engine from ``config`` and serve the cluster until SIGTERM (drain) or
    SIGINT; with ``metrics_port``, the engine's metrics too."""
    conn.client(url).ping()  # a wrong URL or password fails before the engine is made
    engine = LocalEngine(config=config)
    engine.load_tokenizers = False  # token ids in, token ids out: the gateways tokenize
    worker = Worker(url, name or f"{socket.gethostname()}-{os.getpid()}", engine, model_roots,
                    heartbeat_s, ttl_s, grace_s)
    signal.signal(signal.SIGTERM, worker.drain)
    metrics = None
    if metrics_port is not None:
        metrics = serve_metrics(engine, metrics_port, metrics_key, metrics_host)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        if metrics is not None:
            metrics.shutdown()
