"""The gateway's engine client: the client protocol over Redis Streams, to a pool of workers.

``submit`` routes each request (``scheduler.router``) and puts it on that worker's inbox
stream; each request's deltas come back on its own output stream, read here. When the
worker holding a request dies (its heartbeat is gone, or its connections are), the request
is moved: everything the dead worker wrote is read first, then the request goes to another
worker with those tokens as ``delivered_token_ids``, so it continues exactly where it was
(counter-based sampling makes seeded sampling continue exactly too). Deltas carry token
indexes, so nothing is shown twice. ``migration_limit`` bounds the moves of one request.
Each placement has an epoch: moving a request raises its fence (``keys.fence``) first, so the
old worker, if it was only slow, stops it, and whatever it still writes is dropped here.

Redis may stall or restart: a stream pauses and retries (backoff with jitter) and resumes
where it was; only an outage longer than ``outage_limit_s`` ends it, with an error. Heartbeat
keys and connections lost during an outage say nothing about the workers: none is taken for
dead until one heartbeat TTL after Redis answers again.

Admin commands change the cluster's registrations (``keys.MODELS``, ``keys.ADAPTERS``);
workers load what they are asked for on demand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import Counter, deque
from pathlib import Path

import redis

from gpupool.cluster import conn, keys, registry
from gpupool.messages.codec import from_wire, to_wire
from gpupool.messages.errors import (
    AdapterError,
    EngineError,
    ModelLoadError,
    RequestError,
    check_token_ids,
)
from gpupool.messages.types import (
    Abort,
    AddAdapter,
    AddModel,
    EngineRequest,
    ModelInfo,
    OutputDelta,
    RemoveAdapter,
    RemoveModel,
    Stats,
    Usage,
)
from gpupool.models.config import ModelConfig
from gpupool.models.sizes import (
    checkpoint_element_bytes,
    model_element_bytes,
    parameter_count,
)
from gpupool.models.tokenizer import eos_token_ids, load_tokenizer
from gpupool.scheduler.router import NoWorker, Router, fits_weights, too_large

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 100  # an output stream checks its worker's health this often when quiet


class _RemoteStream:
    """One request's deltas from its output stream, deduplicated by index, moved to another
    worker when its worker dies."""

    def __init__(self, client: RedisClient, req: EngineRequest, worker: str):
        self.client, self.req, self.request_id = client, req, req.request_id
        self.worker = worker
        self.moves = 0
        self.epoch = 0  # the placement this stream reads (raised by each move)
        self.last_id = "0-0"
        self.tokens = list(req.delivered_token_ids)  # every output token received
        self.pending: deque[OutputDelta] = deque()
        self.finished = False  # a final delta was received
        self.done = False  # iteration over
        self.lease_at = time.monotonic()  # when the reader key was last renewed

    def __aiter__(self):
        return self

    async def __anext__(self) -> OutputDelta:
        if self.done:
            raise StopAsyncIteration
        while not self.pending:
            try:
                if not await self._read(READ_BLOCK_MS):
                    await self._check_worker()
            except redis.RedisError as e:  # a stall or a restart: pause, then go on
                try:
                    wait = self.client.redis_failed(e)
                except conn.OutageTooLong as too_long:
                    self._end(str(too_long))
                    continue
                await asyncio.sleep(wait)
        delta = self.pending.popleft()
        if delta.finished:
            self.done = True
            self.client._where.pop(self.request_id, None)
        return delta

    async def _read(self, block: int | None) -> bool:
        async def read(ar):
            if time.monotonic() - self.lease_at > keys.READER_TTL_S / 3:  # still reading
                self.lease_at = time.monotonic()
                await ar.set(keys.reader(self.request_id), 1,
                             px=int(keys.READER_TTL_S * 1000))
            return await ar.xread({keys.outbox(self.request_id): self.last_id}, count=256,
                                  block=block)

        got = await self.client._call(read)
        for _, entries in got or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                if int(fields.get(b"epoch", 0)) != self.epoch:  # a fenced placement's
                    await self.client.fenced_delta()
                    continue
                self._accept(from_wire(json.loads(fields[b"msg"])))
        return bool(got)

    def _end(self, error: str) -> None:
        """End the stream with ``error`` (an abort delta after the tokens it has)."""
        self._accept(OutputDelta(self.request_id, len(self.tokens), finish_reason="abort",
                                 usage=Usage(len(self.req.prompt_token_ids), len(self.tokens)),
                                 error=error))

    def _accept(self, d: OutputDelta) -> None:
        if self.finished:
            return
        skip = len(self.tokens) - d.index
        if skip < 0:  # a gap: never expected (a worker writes every token it samples)
            logger.error("request %s: tokens %d..%d never arrived", self.request_id,
                         len(self.tokens), d.index)
            skip = 0
        toks = d.token_ids[skip:]
        lps = d.logprobs[skip:] if d.logprobs is not None else None
        if not toks and not d.finished:
            return
        # every field of the worker's delta (embedding, cached tokens, prompt logprobs) but
        # the tokens a copy already delivered
        self.pending.append(dataclasses.replace(d, request_id=self.request_id,
                                                index=len(self.tokens), token_ids=toks,
                                                logprobs=lps))
        self.tokens.extend(toks)
        self.finished = d.finished

    async def _check_worker(self) -> None:
        if await self.client.worker_alive(self.worker):
            return
        dead = self.worker
        while await self._read(None):  # what the dead worker wrote that was not read yet
            pass
        if self.finished:
            return
        degree = self.client.degree_of(dead)  # moves to its own kind
        await self.client.forget_worker_async(dead)
        p = self.req.params
        usage = Usage(len(self.req.prompt_token_ids), len(self.tokens))
        if len(self.tokens) >= p.max_tokens:  # it died between its last token and the end
            self._accept(OutputDelta(self.request_id, len(self.tokens), finish_reason="length",
                                     usage=usage))
            return
        if self.moves >= self.client.migration_limit:
            self._accept(OutputDelta(self.request_id, len(self.tokens), finish_reason="abort",
                                     usage=usage, error=f"worker {dead} died; the request was "
                                     f"already moved {self.moves} times"))
            return
        moved = dataclasses.replace(self.req, delivered_token_ids=tuple(self.tokens))
        try:
            worker = await asyncio.to_thread(self.client._route, moved, frozenset({dead}),
                                             degree)
        except (NoWorker, EngineError) as e:
            self._accept(OutputDelta(self.request_id, len(self.tokens), finish_reason="abort",
                                     usage=usage, error=f"worker {dead} died: {e}"))
            return
        epoch = self.epoch + 1

        async def fence(ar):  # before the new placement exists: the old one stops
            await ar.set(keys.fence(self.request_id), epoch, ex=keys.OUT_TTL_S)

        await self.client._call(fence)
        await self.client._send(worker, moved, epoch)
        # only once sent: a send that failed (Redis away) is retried from the liveness check
        self.moves += 1
        self.worker, self.epoch = worker, epoch
        logger.warning("request %s: worker %s died after %d tokens; moved to %s",
                       self.request_id, dead, len(self.tokens), worker)
        self.client._where[self.request_id] = worker
        await self.client._call(lambda ar: ar.incr(keys.REDISPATCHED))

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            await self.client.abort(self.request_id)


class RedisClient:
    """The client protocol (``gpupool.messages.client.EngineClient``) over a cluster."""

    def __init__(self, url: str, home: str, migration_limit: int = 3,
                 liveness_s: float = 0.1, router: Router | None = None,
                 policy: str = "token", default_slo: tuple[float, float] | None = None,
                 outage_limit_s: float = conn.OUTAGE_LIMIT_S):
        self.url = url
        # (ttft_ms, tbt_ms) of a model registered without its own: the workers' default,
        # as this gateway's configuration has it (for SLO metrics; None: not counted)
        self.default_slo = default_slo
        self.r = conn.client(url)
        self.r.ping()
        self.outage = conn.Outage(outage_limit_s)
        self._home = home
        self.router = router or Router()
        self.migration_limit = migration_limit
        self.liveness_s = liveness_s
        self.policy = policy
        self._where: dict[str, str] = {}  # request id -> the worker holding it
        self._ar: tuple | None = None  # (event loop, asyncio client)
        self._workers: tuple[float, list] = (0.0, [])
        self._views: dict = {}
        # each worker's tensor-parallel degree as last seen, kept after the registry forgets
        # it: a dead worker's streams find their own kind even after another stream of it
        # (or another gateway) removed it and the views were read again
        self._degrees: dict[str, int] = {}
        self._specs: tuple[float, dict, dict] = (0.0, {}, {})
        self._configs: dict[str, ModelConfig] = {}
        self._tokenizers: dict[str, object] = {}
        self._infos: dict[tuple, ModelInfo] = {}
        self._param_counts: dict[str, int] = {}
        self._elem_bytes: dict[str, float] = {}  # a 4-bit checkpoint folder: 0.75
        self.routes: Counter[str] = Counter()
        self.routes_by_worker: Counter[str] = Counter()  # requests routed to each worker
        self.closed = False

    # ---- Redis -------------------------------------------------------------------------------
    def _aredis(self):
        loop = asyncio.get_running_loop()
        if self._ar is None or self._ar[0] is not loop:
            self._ar = (loop, conn.async_client(self.url))
        return self._ar[1]

    async def _call(self, fn):
        """``await fn(client)``, once more on a fresh connection if a pooled one was closed
        (Redis restarted: every connection in the pool is stale, one by one)."""
        ar = self._aredis()
        try:
            result = await fn(ar)
        except redis.ConnectionError:
            await ar.connection_pool.disconnect()
            result = await fn(ar)
        self.outage.ok()
        return result

    def redis_failed(self, e: Exception) -> float:
        """A call failed: the seconds to wait before the next try (OutageTooLong past the
        outage limit)."""
        if self.outage.since is None:
            logger.warning("the cluster's Redis is unavailable (%s); streams pause",
                           conn.redact(e))
        return self.outage.failed()

    async def fenced_delta(self) -> None:
        """Count a delta dropped because its placement was fenced (``keys.FENCED``)."""
        await self._call(lambda ar: ar.incr(keys.FENCED))

    async def _send(self, worker: str, msg, epoch: int = 0) -> None:
        async def send(ar):
            pipe = ar.pipeline(transaction=False)
            if isinstance(msg, EngineRequest):  # someone reads it (renewed while read)
                pipe.set(keys.reader(msg.request_id), 1, px=int(keys.READER_TTL_S * 1000))
            pipe.xadd(keys.inbox(worker), {"msg": json.dumps(to_wire(msg)), "epoch": epoch})
            await pipe.execute()

        await self._call(send)

    # ---- workers -----------------------------------------------------------------------------
    def workers(self, fresh: bool = False) -> list[tuple[registry.WorkerInfo, bool]]:
        at, cached = self._workers
        if fresh or time.monotonic() - at > self.liveness_s:
            cached = self._set_workers(registry.read_workers(self.r))
        return cached

    def _set_workers(self, cached: list) -> list:
        self._workers = (time.monotonic(), cached)
        # fresh views: what the router sent since is in the workers' own counts now
        self._views = {info.name: info.view(alive) for info, alive in cached}
        self._degrees.update((name, v.tensor_parallel) for name, v in self._views.items())
        return cached

    def degree_of(self, worker: str) -> int:
        """``worker``'s tensor-parallel ranks as last seen (1 if never seen)."""
        return self._degrees.get(worker, 1)

    def _grace_s(self) -> float:
        """How long after an outage a missing heartbeat says nothing: the longest heartbeat
        TTL the workers announced (3 s, a worker's default, before any), plus a second (a
        worker's longest wait between tries)."""
        return (max((info.ttl_s for info, _ in self._workers[1]), default=0.0) or 3.0) + 1.0

    async def worker_alive(self, name: str) -> bool:
        """Whether ``name`` is alive (read on the event loop's client); True during an
        outage and one heartbeat TTL after it."""
        if self.outage.recent(self._grace_s()):
            return True
        at, cached = self._workers
        if time.monotonic() - at > self.liveness_s:
            cached = self._set_workers(await self._call(registry.read_workers_async))
        return any(info.name == name and alive for info, alive in cached)

    async def forget_worker_async(self, name: str) -> None:
        """Drop a dead worker from the registry, its inbox too (every gateway may; it is
        idempotent): a restarted worker of the same name starts empty, and what the dead one
        held was moved."""
        for info, alive in await self._call(registry.read_workers_async):
            if info.name == name and not alive:
                async def forget(ar):
                    pipe = ar.pipeline()
                    pipe.srem(keys.WORKERS, name)
                    pipe.delete(keys.worker_key(name), keys.inbox(name))
                    await pipe.execute()

                await self._call(forget)
        self._workers = (0.0, [])

    def _route(self, req: EngineRequest, exclude: frozenset[str] = frozenset(),
               degree: int | None = None) -> str:
        info = self.model_info(req.model)
        if info is None:
            raise RequestError(f"model {req.model!r} is not loaded")
        self.workers()
        spec = self._read_specs()[0].get(info.base, {})
        route = self.router.route(info.base, list(self._views.values()),
                                  self._params(info.folder), exclude=exclude,
                                  element_bytes=(model_element_bytes(spec.get("dtype"),
                                                                     spec.get("quantization"))
                                                 or self._checkpoint_bytes(info.folder)),
                                  adapter=info.adapter, degree=degree,
                                  refusal=self._config(info.folder).tp_refusal)
        self.routes[route.reason] += 1
        self.routes_by_worker[route.worker] += 1
        return route.worker

    # ---- the protocol ------------------------------------------------------------------------
    async def submit(self, requests) -> list[_RemoteStream]:
        routed = []
        for i, req in enumerate(requests):
            self._check(req, i if len(requests) > 1 else None)
        try:
            for req in requests:
                routed.append((req, self._route(req)))
            streams = []
            for req, worker in routed:
                self._where[req.request_id] = worker
                await self._send(worker, req)
                streams.append(_RemoteStream(self, req, worker))
        except NoWorker as e:
            raise EngineError(str(e)) from None
        except redis.RedisError as e:  # Redis unreachable: the HTTP layer answers 503
            raise EngineError(f"the cluster's Redis is unavailable: {e}") from None
        return streams

    def _check(self, req: EngineRequest, i: int | None) -> None:
        """What the gateway can check before a worker sees the request."""
        info = self.model_info(req.model)
        where = "" if i is None else f"prompt {i}: "
        if info is None:
            raise RequestError(f"{where}model {req.model!r} is not loaded")
        ids = req.prompt_token_ids
        if not ids:
            raise RequestError(f"{where}prompt is empty")
        try:
            check_token_ids(ids, info.vocab_size)
        except RequestError as e:
            raise RequestError(f"{where}{e}") from None
        total = len(ids) + req.params.max_tokens
        if total > info.context_limit:
            raise RequestError(f"{where}model {req.model!r} has a context window of "
                               f"{info.context_limit} tokens")
        # the KV capacity the workers holding the model report (a worker that has not
        # loaded it yet reports none: then the worker refuses, in the stream)
        caps = [w.kv_capacity[info.base] for w, alive in self.workers()
                if alive and info.base in w.kv_capacity]
        if caps and total > max(caps):
            raise RequestError(f"{where}request needs up to {total} tokens of KV cache, but "
                               f"the largest worker holds {max(caps)} tokens of model "
                               f"{req.model!r}; lower max_tokens or the prompt")

    async def abort(self, request_id: str) -> None:
        """Tell the request's worker to stop it. Never raises: with Redis away the worker
        stops it anyway once the request's reader lease runs out."""
        worker = self._where.pop(request_id, None)
        if worker is not None:
            try:
                await self._send(worker, Abort(request_id))
            except redis.RedisError as e:
                logger.info("request %s: abort not sent (%s); its reader lease will end it",
                            request_id, conn.redact(e))

    async def command(self, cmd) -> None:
        r = self.r
        models, adapters = self._read_specs(fresh=True)
        if isinstance(cmd, AddModel):
            same = models.get(cmd.name, {}).get("path") == cmd.path
            if (cmd.name in models and not same) or cmd.name in adapters:
                raise RequestError(f"{cmd.name!r} is already the name of a model or adapter")
            self._config(cmd.path)  # a folder the gateway cannot read is refused now
            live = [info.view(alive) for info, alive in self.workers(fresh=True) if alive]
            params = self._params(cmd.path)
            eb = (model_element_bytes(cmd.dtype, cmd.quantization)
                  or self._checkpoint_bytes(cmd.path))
            if live and not any(fits_weights(w, params, eb) for w in live):
                raise ModelLoadError(too_large(cmd.name, params, live, eb))
            why = [self._config(cmd.path).tp_refusal(w.tensor_parallel) for w in live]
            if live and all(why):  # every worker shards over ranks the model cannot split
                raise ModelLoadError(f"model {cmd.name!r}: {why[0]}")
            r.hset(keys.MODELS, cmd.name, json.dumps(
                {"path": cmd.path, "ttft_ms": cmd.ttft_ms, "tbt_ms": cmd.tbt_ms,
                 "dtype": cmd.dtype, "quantization": cmd.quantization}))
        elif isinstance(cmd, AddAdapter):
            same = adapters.get(cmd.name) == {"base": cmd.base, "path": cmd.path}
            if cmd.replace and adapters.get(cmd.name, {}).get("base") != cmd.base:
                raise AdapterError(f"adapter {cmd.name!r} of {cmd.base!r} is not loaded: "
                                   "nothing to replace")
            if (cmd.name in adapters and not same and not cmd.replace) or cmd.name in models:
                raise AdapterError(f"{cmd.name!r} is already the name of a model or adapter")
            if cmd.base not in models:
                raise AdapterError(f"base model {cmd.base!r} is not loaded")
            if not (Path(cmd.path) / "adapter_config.json").is_file():
                raise AdapterError(f"{cmd.path}: no adapter_config.json (a PEFT LoRA folder)")
            r.hset(keys.ADAPTERS, cmd.name, json.dumps({"base": cmd.base, "path": cmd.path}))
            if cmd.replace:  # workers holding it swap in the new weights; others load them
                for info, alive in self.workers(fresh=True):
                    if alive:
                        await self._send(info.name, cmd)
        elif isinstance(cmd, (RemoveModel, RemoveAdapter)):
            table = keys.MODELS if isinstance(cmd, RemoveModel) else keys.ADAPTERS
            if not r.hdel(table, cmd.name):
                raise RequestError(f"model {cmd.name!r} is not loaded")
            for info, alive in self.workers(fresh=True):
                if alive:  # each drops it once its running requests finish
                    await self._send(info.name, cmd)
        else:
            raise TypeError(f"{type(cmd).__name__} is not an admin command")
        self._specs = (0.0, {}, {})

    async def stats(self) -> Stats:
        workers = self.workers(fresh=True)
        live = [w for w, alive in workers if alive]
        models, adapters = self._read_specs()
        total = sum(w.kv_pages_total for w in live)
        free = sum(w.kv_pages_free for w in live)
        resident = sorted({m for w in live for m in w.resident})
        per_model = {}
        for name in models:
            holders = [w for w in live if name in w.models]
            per_model[name] = {"resident": any(name in w.resident for w in live),
                               "weight_bytes": 0, "removing": False, "waiting": 0,
                               "running": 0, "max_loras": 0, "adapter_pages": 0,
                               "resident_adapters": [],
                               "workers": [w.name for w in holders]}
        view = []
        for w, alive in workers:
            view.append({"name": w.name, "device": w.device, "alive": alive,
                         "draining": w.draining, "host": w.host, "pid": w.pid,
                         "models": list(w.resident), "loaded": list(w.models),
                         "adapters": list(w.adapters),
                         "running": w.running, "queued": w.queued,
                         "kv_pages_free": w.kv_pages_free, "step_s": round(w.step_s, 4),
                         "heartbeat_age_s": _rounded(registry.heartbeat_age(w))})
        return Stats(
            device="cluster", policy=self.policy,
            arena={"total_bytes": 0, "weights": {"bytes": sum(w.weight_bytes for w in live),
                                                 "used_bytes": 0},
                   "kv": {"bytes": 0}},
            kv_pages={"page_bytes": 0, "total": total, "used": total - free, "free": free,
                      "host_total": 0, "host_used": 0},
            swaps=dict.fromkeys(("weight_swaps", "weight_bytes", "weight_seconds",
                                 "weight_prefetches", "weight_prefetch_hits",
                                 "weight_prefetches_wasted", "kv_pages_out", "kv_pages_in",
                                 "kv_bytes"), 0),
            resident_models=tuple(resident), models=per_model,
            adapters={n: a["base"] for n, a in adapters.items()},
            requests=sum(w.running + w.queued for w in live),
            workers=tuple(view),
            cluster={"workers_alive": len(live), "workers_dead": len(workers) - len(live),
                     "redispatched": int(self.r.get(keys.REDISPATCHED) or 0),
                     "fenced_deltas": int(self.r.get(keys.FENCED) or 0),
                     "routes": dict(self.routes),
                     "routes_by_worker": dict(self.routes_by_worker)})

    # ---- what is served ----------------------------------------------------------------------
    def _read_specs(self, fresh: bool = False) -> tuple[dict, dict]:
        at, models, adapters = self._specs
        if fresh or time.monotonic() - at > 0.5:
            models = {k.decode(): json.loads(v) for k, v in self.r.hgetall(keys.MODELS).items()}
            adapters = {k.decode(): json.loads(v)
                        for k, v in self.r.hgetall(keys.ADAPTERS).items()}
            self._specs = (time.monotonic(), models, adapters)
        return models, adapters

    def _params(self, folder: str) -> int:
        if folder not in self._param_counts:
            try:
                self._param_counts[folder] = parameter_count(folder)
            except ModelLoadError:
                self._param_counts[folder] = 0  # unknown: the worker will say
        return self._param_counts[folder]

    def _checkpoint_bytes(self, folder: str) -> float:
        """Bytes an element of a 4-bit checkpoint (0: the worker's dtype), read once."""
        if folder not in self._elem_bytes:
            self._elem_bytes[folder] = checkpoint_element_bytes(folder)
        return self._elem_bytes[folder]

    def _config(self, folder: str) -> ModelConfig:
        if folder not in self._configs:
            self._configs[folder] = ModelConfig.from_folder(Path(folder))
        return self._configs[folder]

    def model_info(self, name: str) -> ModelInfo | None:
        models, adapters = self._read_specs()
        base = (adapters.get(name) or {}).get("base")
        key = (name, json.dumps(models.get(name)), json.dumps(adapters.get(name)),
               json.dumps(models.get(base)))
        if key in self._infos:  # the same registration as last time: the same answer
            return self._infos[key]
        info = self._model_info(name, models, adapters)
        if info is not None:
            self._infos[key] = info
        return info

    def _model_info(self, name: str, models: dict, adapters: dict) -> ModelInfo | None:
        if name in models:
            base, adapter = name, None
        elif name in adapters and adapters[name]["base"] in models:
            base, adapter = adapters[name]["base"], name
        else:
            return None
        folder = models[base]["path"]
        try:
            cfg = self._config(folder)
            eos = eos_token_ids(Path(folder), cfg, self._tokenizer(folder))
        except (ModelLoadError, OSError):
            return None
        spec = models[base]  # SLOs given at registration, else the workers' default
        ttft, tbt = self.default_slo or (None, None)
        return ModelInfo(name, base, adapter, folder, cfg.vocab_size, cfg.max_model_len,
                         tuple(eos), spec.get("ttft_ms") or ttft, spec.get("tbt_ms") or tbt)

    def _tokenizer(self, folder: str):
        if folder not in self._tokenizers:
            self._tokenizers[folder] = load_tokenizer(Path(folder))
        return self._tokenizers[folder]

    def tokenizer(self, model: str):
        info = self.model_info(model)
        if info is None:
            raise RequestError(f"model {model!r} is not loaded")
        return self._tokenizer(info.folder)

    def holds_name(self, name: str) -> bool:
        models, adapters = self._read_specs()
        return name in models or name in adapters

    def num_unfinished(self) -> int:
        return len(self._where)

    @property
    def alive(self) -> bool:
        if self.closed:
            return False
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    @property
    def home(self) -> str:
        return self._home

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.r.close()


def _rounded(age: float | None) -> float | None:
    return None if age is None else round(age, 3)
