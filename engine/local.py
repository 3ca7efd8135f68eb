"""The engine in this process: the pool, the model workers and :class:`EngineCore` wired
together, the step loop in one background thread (:class:`LocalEngine`), and the client
protocol over it (:class:`LocalClient`), which is all the HTTP layer and ``Engine.generate``
use.

    engine = LocalEngine(Config.from_env(device="cpu"))
    engine.add_model("smollm2", "smollm2")
    client = LocalClient(engine)
    [stream] = await client.submit([EngineRequest("r1", "smollm2", ids, params)])
    async for delta in stream: ...
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from gpupool.config import Config
from gpupool.default_model import DEFAULT_MODEL, ensure_default_model, ensure_gguf_model
from gpupool.engine.core import EngineCore, Sink
from gpupool.kernels import native
from gpupool.messages.client import QueueStream
from gpupool.messages.errors import ModelLoadError, RequestError
from gpupool.messages.types import (
    AddAdapter,
    AddModel,
    AdminCommand,
    EngineRequest,
    ModelInfo,
    OutputDelta,
    RemoveAdapter,
    RemoveModel,
    Stats,
)
from gpupool.models.loaded import LoadedModel
from gpupool.pool.arena import Arena
from gpupool.pool.kv import KVStorage
from gpupool.pool.residency import WeightPool
from gpupool.scheduler.slo import SLO

logger = logging.getLogger(__name__)
SNAPSHOT_S = 0.2  # the step loop publishes the engine's stats at most this often (snapshot)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return dev


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def default_kv_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(free_bytes(device) * 0.3)
    return min(3 << 30, int(free_bytes(device) * 0.25))  # (adapters' pages too)


def default_weight_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(free_bytes(device) * 0.4)
    return min(8 << 30, int(free_bytes(device) * 0.3))


def worker_weight_bytes(pool: WeightPool, name: str) -> int:
    entry = pool.entries.get(name)
    return entry.layout.num_bytes if entry is not None else 0


def one_thread(fn):
    """``fn`` for a helper thread: torch work in it runs on one intra-op thread (see
    ``LocalEngine._loop``: a second OpenMP team slows the step loop's)."""

    def run(*args, **kwargs):
        torch.set_num_threads(1)
        return fn(*args, **kwargs)

    return run


class _EngineLock(threading.Condition):
    """The engine's lock and condition, counting the threads queued to take it
    (``queued``: list appends and pops are atomic under the GIL), so the step loop yields
    between steps only when one is (see ``LocalEngine._loop``)."""

    def __init__(self):
        super().__init__()
        self.queued: list[None] = []

    def __enter__(self):
        self.queued.append(None)
        try:
            return super().__enter__()
        finally:
            self.queued.pop()


class LocalEngine:
    """Many models, one KV pool, continuous batching, the step loop in its own thread;
    thread-safe public methods. Token ids in, :class:`OutputDelta` messages out."""

    def __init__(self, device: str = "auto", config: Config | None = None, **overrides):
        self.config = config or Config.from_env(device=device, **overrides)
        self.device = resolve_device(self.config.device)
        self.threads = self.config.threads or torch.get_num_threads()
        if self.device.type == "cpu" and self.config.native:
            # the native kernels built and checked now, never inside a step: the sampler's
            # argmax and finiteness check use them in every dtype, the bf16 layers too
            native.available()
        pool = self.config.pool
        kv_bytes = pool.kv_cache_bytes or default_kv_bytes(self.device)
        num_pages = kv_bytes // pool.kv_page_bytes
        self.arena = Arena(pool.weight_bytes or default_weight_bytes(self.device),
                           num_pages * pool.kv_page_bytes, self.device)
        self.kv = KVStorage(num_pages, pool.kv_page_bytes, self.device, self.arena.kv)
        self.kv.enable_host_swap(pool.host_kv_bytes // pool.kv_page_bytes)
        self.tp = None  # the other tensor-parallel ranks (engine/tp.py)
        if self.config.tensor_parallel > 1:
            self.tp = self._start_ranks(num_pages, pool)
        host_bytes = pool.host_cache_bytes or int(psutil.virtual_memory().available * 0.5)
        self.weights = WeightPool(self.arena, host_bytes)
        self.core = EngineCore(self.config.scheduler, self.kv.pages, self.kv,
                               prefetch=pool.prefetch)
        self._lock = _EngineLock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._loading: set[str] = set()  # model names being read from disk
        self._aborts: collections.deque[str] = collections.deque()  # applied by the loop
        self._ids = itertools.count()
        self._snapshot: tuple[float, dict] | None = None  # (monotonic time, stats) published
        self._snapshots_read = False  # someone reads snapshot(): the loop publishes
        self.load_tokenizers = True  # False in a cluster worker (its gateways tokenize)
        logger.info("engine on %s: %d KV pages of %d KiB", self.device,
                    self.kv.pages.num_pages, pool.kv_page_bytes // 1024)

    def _start_ranks(self, num_pages: int, pool):
        """The other ranks, started; a KV swap moves every rank's share of the pages
        (``KVStorage.mirror``)."""
        from gpupool.engine.tp import TPRanks

        if self.device.type != "cpu":
            raise ValueError("tensor_parallel > 1 runs on CPU (gloo) only so far")
        ranks = TPRanks(self.config.tensor_parallel, num_pages, pool.kv_page_bytes,
                        pool.host_kv_bytes // pool.kv_page_bytes, self.threads)
        self.kv.mirror = lambda pairs, to_host: ranks.command("copy", list(pairs), to_host)
        return ranks

    # ---- models ---------------------------------------------------------------------------
    def resolve_model_path(self, path: str | Path) -> Path:
        if str(path) == DEFAULT_MODEL:
            return ensure_default_model(self.config.home)
        folder = Path(path).expanduser()
        if folder.suffix == ".gguf" and folder.is_file():  # converted once, then reused
            return ensure_gguf_model(self.config.home, folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: model folder does not exist")
        return folder

    def add_model(self, name: str, path: str | Path = DEFAULT_MODEL, slo: SLO | None = None,
                  dtype: str | None = None, quantization: str | None = None):
        """Load a model folder (or ``"smollm2"``) and serve it as ``name`` (with its own
        latency objectives, dtype and quantization ("int8", "none"), else the config's)."""
        with self._lock:
            if name in self.core.workers or name in self._loading:
                raise RequestError(f"model {name!r} is already loaded")
            if self.core.adapters.holds(name):
                raise RequestError(f"{name!r} is already the name of an adapter")
            self._loading.add(name)  # a concurrent add of the same name fails above
        try:
            worker = LoadedModel(name, self.resolve_model_path(path), self.device, self.kv,
                                 dtype or self.config.dtype, self.config.adapters, self.weights,
                                 tokenizer=self.load_tokenizers,
                                 quantization=quantization or self.config.quantization,
                                 cuda_graphs=self.config.cuda_graphs,
                                 kernels=self.config.kernels, use_native=self.config.native,
                                 batch_invariant=self.config.batch_invariant, tp=self.tp)
            if self.tp is not None:  # rank 0 read its shard: the others read theirs
                with self._lock:
                    self.tp.command("load", name, str(worker.folder),
                                    str(worker.dtype).removeprefix("torch."),
                                    worker.quantization, self.config.kernels,
                                    self.config.native, self.config.batch_invariant)
            with self._lock:
                try:
                    self.core.add_worker(worker)
                except RequestError:
                    self.weights.unregister(name)
                    raise
                if slo is not None:
                    self.core.set_slo(name, slo)
        finally:
            with self._lock:
                self._loading.discard(name)

    def slo(self, ttft_ms: float | None, tbt_ms: float | None) -> SLO | None:
        """A model's own latency objectives (the config's default for the one not given), or
        None when neither is given (the model keeps the defaults)."""
        if ttft_ms is None and tbt_ms is None:
            return None
        default = self.config.scheduler
        return SLO(default.ttft_ms if ttft_ms is None else ttft_ms,
                   default.tbt_ms if tbt_ms is None else tbt_ms)

    def remove_model(self, name: str) -> None:
        """Refuse new requests for ``name`` now; running ones finish, then it is dropped."""
        with self._lock:
            self.core.remove_model(name)

    def add_adapter(self, name: str, base: str, path: str | Path,
                    replace: bool = False) -> None:
        """Serve the PEFT LoRA adapter in folder ``path`` as ``name``, on loaded ``base``;
        ``replace``: the loaded adapter ``name`` gets these weights (its running requests
        finish on the old ones; vLLM's load_inplace)."""
        with self._lock:
            self.core.add_adapter(name, base, str(Path(path).expanduser()), replace)

    def remove_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` now; running ones finish, then it is dropped."""
        with self._lock:
            self.core.remove_adapter(name)

    @property
    def models(self) -> list[str]:
        return list(self.core.workers)  # one C-level copy under the GIL: no lock needed

    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name -> base model, for adapters that take requests."""
        with self._lock:
            return {n: r.base for n, r in self.core.adapters.names().items()}

    def holds_name(self, name: str) -> bool:
        """Whether a model or adapter of this name is loaded, one being removed (draining its
        running requests) included; a snapshot read without the lock."""
        return name in self.core.workers or self.core.adapters.holds(name)

    def num_unfinished(self) -> int:
        """Requests queued or running, over all models (a snapshot, read without the lock)."""
        return len(self.core.requests)

    def submit(self, requests: Sequence[EngineRequest], sinks: Sequence[Sink | None]) -> list[str]:
        """Queue several requests at once, or none: each is checked first (RequestError
        names the first bad one). One lock acquisition; grammars are compiled before it."""
        for req in requests:
            if req.params.structured is not None:
                try:
                    self.core.compile_grammar(req)  # cached: the check below finds it
                except (RequestError, KeyError):
                    pass  # the check below says what is wrong, with the prompt's index
        with self._lock:
            totals = []
            for i, req in enumerate(requests):
                try:
                    totals.append(self.core.check_request(req))
                except RequestError as e:
                    err = RequestError(f"prompt {i}: {e}" if len(requests) > 1 else str(e))
                    err.param = getattr(e, "param", None)  # the field to name, if not prompt
                    raise err from None
            rids: list[str] = []
            try:
                for req, sink, total in zip(requests, sinks, totals):
                    rids.append(self.core.enqueue(req, sink, total=total))
            except BaseException:
                for rid in rids:  # all or none
                    self.core.abort(rid)
                raise
            self._ensure_thread()
            self._lock.notify()
        return rids

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def model_name(self, model: str | None) -> str:
        """``model``, or the one model served when it is None (RequestError if several)."""
        if model is not None:
            return model
        if len(self.core.workers) != 1:
            raise RequestError("name the model: the engine serves "
                               f"{len(self.core.workers)} models")
        return next(iter(self.core.workers))

    def model_info(self, name: str) -> ModelInfo | None:
        """What ``name`` is, if it takes requests now (a snapshot read without the lock).
        Its context limit is the model's window, or the KV pool's capacity in that model's
        tokens if smaller (unless every layer has a sliding window the pool holds)."""
        try:
            base, adapter = self.core.resolve(name)
            worker = self.core.workers[base]
        except (RequestError, KeyError):
            return None
        slo = self.core.scheduler.policy.slo(base)
        limit = worker.cfg.max_model_len
        if self.core.scheduler.peak_pages(base, limit) > self.kv.pages.num_pages:
            limit = self.core.scheduler.max_tokens(base, self.kv.pages.num_pages, limit)
        return ModelInfo(name, base, adapter, str(worker.folder), worker.cfg.vocab_size,
                         limit, tuple(worker.eos_token_ids), slo.ttft_ms, slo.tbt_ms)

    def tokenizer(self, model: str):
        """The tokenizer of ``model``'s base (None if it has none); KeyError/RequestError if
        ``model`` is not served."""
        return self.core.workers[self.core.resolve(model)[0]].tokenizer

    def stats(self) -> dict:
        """A snapshot of the pool for operators: arena regions, resident models and adapters,
        KV pages, swaps, queue depth per model (plain ints, floats and strings)."""
        with self._lock:
            return self._publish()

    def snapshot(self) -> dict:
        """:meth:`stats` without waiting for a step: fresh when the engine lock is free,
        else what the step loop last published (after a step, at most ``SNAPSHOT_S`` apart).
        What a cluster worker's heartbeat reads: a step longer than the heartbeat's TTL must
        not make a live worker look dead."""
        self._snapshots_read = True
        if self._lock.acquire(blocking=False):
            try:
                self._publish()
            finally:
                self._lock.release()
        return self._snapshot[1] if self._snapshot is not None else {}

    def _publish(self) -> dict:
        """:meth:`stats` (the lock held), kept with the recent step time as the snapshot."""
        s = self._stats()
        step_s = max(self.core.cost.step_s.values(), default=0.0)
        self._snapshot = (time.monotonic(), {**s, "step_s": step_s})
        return s

    def _stats(self) -> dict:
        arena, kv, w = self.arena, self.kv, self.weights
        weight_used = arena.weight_bytes - arena.weight_slabs.num_free_bytes
        return {
            "device": str(self.device),
            "policy": self.config.scheduler.policy,
            "arena": {
                "total_bytes": arena.num_bytes,
                "weights": {"bytes": arena.weight_bytes, "used_bytes": weight_used},
                "kv": {"bytes": arena.kv_bytes},
            },
            "kv_pages": self._kv_stats(),
            "swaps": {
                "weight_swaps": w.num_swaps,
                "weight_bytes": w.swap_bytes,
                "weight_seconds": w.swap_seconds,
                "weight_prefetches": w.num_prefetches,
                "weight_prefetch_hits": w.prefetch_hits,
                "weight_prefetches_wasted": w.prefetch_wasted,
                "kv_pages_out": kv.num_pages_swapped_out,
                "kv_pages_in": kv.num_pages_swapped_in,
                "kv_bytes": (kv.num_pages_swapped_out + kv.num_pages_swapped_in)
                * kv.page_bytes,
            },
            "resident_models": list(w.resident),
            "recent_swaps": list(w.recent),
            "models": {name: self._model_stats(name, worker)
                       for name, worker in self.core.workers.items()},
            "adapters": {n: r.base for n, r in self.core.adapters.refs.items()},
            "requests": len(self.core.requests),
        }

    def _kv_stats(self) -> dict:
        kv, host = self.kv, self.kv.host_pages
        return {
            "page_bytes": kv.page_bytes,
            "total": kv.pages.num_pages,
            "used": kv.pages.num_used_pages,
            # free or cached-unheld (evictable); adapters' pages apart, idle ones evictable too
            "free": kv.pages.num_free_pages - kv.pages.num_idle_adapter_pages,
            "cached": kv.pages.num_cached_pages,  # in the prefix index
            "evictable": kv.pages.num_evictable_pages,  # cached and held by none
            "prefix_cache_evictions": kv.pages.num_evicted,
            # pages holding adapters' device copies (adapters/paged.py), and adapters evicted
            "adapters": kv.pages.num_adapter_pages,
            "adapter_evictions": kv.pages.num_adapters_evicted,
            "host_total": host.num_pages if host is not None else 0,
            "host_used": host.num_used_pages if host is not None else 0,
        }

    def _model_stats(self, name: str, worker: LoadedModel) -> dict:
        w, sched, paged = self.weights, self.core.scheduler, worker.adapter_pages
        return {
            "dtype": str(worker.dtype).removeprefix("torch."),
            "quantization": worker.quantization,
            "resident": w.is_resident(name) if name in w.entries else True,
            "weight_bytes": worker_weight_bytes(w, name),
            "removing": name in self.core.removing_models,
            "last_used": self.core.last_used.get(name),  # Unix time of its last step
            "waiting": len(sched.waiting.get(name, ())),
            "running": len(sched.running.get(name, ())),
            # prefix cache: prompt tokens looked up, and found cached
            "prefix_cache_queries": sched.cache_queries[name],
            "prefix_cache_hits": sched.cache_hits[name],
            "preemptions": sched.preemptions_by_model[name],
            "running_adapters": sorted({q.adapter for q in sched.running.get(name, ())
                                        if q.adapter}),
            "waiting_adapters": sorted({q.adapter for q in sched.waiting.get(name, ())
                                        if q.adapter}),
            # distinct adapters a step may hold (vLLM's max_lora): max_loras_on_device, or 0
            # where the pages decide
            "max_loras": worker.adapter_config.max_loras_on_device or 0,
            # KV pool pages holding this model's adapters (adapters/paged.py)
            "adapter_pages": sum(len(p) for (m, _), p in self.kv.pages.adapters().items()
                                 if m == name),
            "resident_adapters": list(paged.resident) if paged is not None else [],
            "host_adapters": list(paged.host) if paged is not None else [],
            # the most tokens one request of this model can hold in the KV pool
            "kv_capacity_tokens": sched.max_tokens(name, self.kv.pages.num_pages,
                                                   self.kv.pages.num_pages * worker.block_tokens),
        }

    def abort(self, request_id: str) -> None:
        """Finish a request now (reason ``abort``). Never waits for a running step: the
        abort is applied at once if the engine lock is free, else before the next step."""
        self._aborts.append(request_id)
        if self._lock.acquire(blocking=False):
            try:
                self._apply_aborts()
            finally:
                self._lock.release()

    def _apply_aborts(self) -> None:
        while self._aborts:
            self.core.abort(self._aborts.popleft())

    # ---- the loop -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpupool-engine",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        # the step's intra-op threads. Other threads that run torch work for the engine
        # (loading, prefetch copies) use one thread each: every thread with an OpenMP team
        # adds workers, and once they outnumber the cores libgomp's workers stop spinning
        # between parallel regions and each region pays a wake-up (measured: a bf16
        # SmolLM2 decode step at batch 16 took 81 ms from a thread beside an idle second
        # team, 53 ms alone)
        torch.set_num_threads(self.threads)
        while True:
            with self._lock:
                while not self._stopped and not self.core.has_work():
                    self._lock.wait()
                if self._stopped:
                    return
                deltas = None
                try:
                    self._apply_aborts()
                    deltas = self.core.step()
                    if self._snapshots_read and (
                            self._snapshot is None
                            or time.monotonic() - self._snapshot[0] > SNAPSHOT_S):
                        self._publish()
                except Exception as e:  # never lose the loop: fail what was in flight
                    logger.exception("engine step failed; failing its requests")
                    self.core.fail_all(f"engine error: {e}")
            # Python's lock is not fair: without a yield the loop takes it again at once. So
            # yield the GIL when a thread is queued for the lock (a new request, a command),
            # when the step sent deltas: their consumers run now, not during the next
            # step's kernels (on 2 cores they would slow its thread team), and after a step
            # that ran nothing (what it waits for may need the GIL). Not otherwise: the yield
            # cost ~0.13 ms a step (final-only requests send nothing a step).
            if deltas is None or deltas or not self.core.ran or self._lock.queued:
                time.sleep(0)

    @property
    def alive(self) -> bool:
        """False once the engine loop has stopped (shutdown)."""
        return not self._stopped and (self._thread is None or self._thread.is_alive())

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (pages no request holds become free); the entries
        dropped."""
        with self._lock:
            return self.kv.pages.evict_all()

    def check_integrity(self) -> None:
        with self._lock:
            self.core.check_integrity()
            self.weights.check_integrity()

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.weights.close()
        if self.tp is not None:
            self.tp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class _OutputStream(QueueStream):
    """One request's deltas, put on an asyncio queue from the engine thread."""

    def __init__(self, engine: LocalEngine, request_id: str):
        super().__init__(request_id, self._abort_now)
        self.engine = engine

    async def _abort_now(self, request_id: str) -> None:
        self.engine.abort(request_id)  # never waits for a step

    def sink(self, loop: asyncio.AbstractEventLoop):
        def put(delta: OutputDelta) -> None:
            try:
                loop.call_soon_threadsafe(self.put, delta)
            except RuntimeError:
                if not loop.is_closed():
                    raise
                # nobody listens any more (the consumer's loop ended): let the request go
                if not delta.finished:
                    self.engine.abort(self.request_id)
        return put


class LocalClient:
    """The client protocol (:class:`gpupool.messages.client.EngineClient`) over a
    :class:`LocalEngine` in this process. Calls that may wait for the engine lock (a step
    can hold it for a while) run in a worker thread, never on the event loop."""

    def __init__(self, engine: LocalEngine):
        self.engine = engine

    async def submit(self, requests: Sequence[EngineRequest]) -> list[_OutputStream]:
        loop = asyncio.get_running_loop()
        streams = [_OutputStream(self.engine, r.request_id) for r in requests]
        await asyncio.to_thread(self.engine.submit, list(requests),
                                [s.sink(loop) for s in streams])
        return streams

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)  # never waits for a step

    async def command(self, cmd: AdminCommand) -> None:
        e = self.engine
        if isinstance(cmd, AddModel):
            await asyncio.to_thread(one_thread(e.add_model), cmd.name, cmd.path,
                                    e.slo(cmd.ttft_ms, cmd.tbt_ms), cmd.dtype, cmd.quantization)
        elif isinstance(cmd, RemoveModel):
            await asyncio.to_thread(one_thread(e.remove_model), cmd.name)
        elif isinstance(cmd, AddAdapter):
            await asyncio.to_thread(one_thread(e.add_adapter), cmd.name, cmd.base, cmd.path,
                                    cmd.replace)
        elif isinstance(cmd, RemoveAdapter):
            await asyncio.to_thread(one_thread(e.remove_adapter), cmd.name)
        else:
            raise TypeError(f"{type(cmd).__name__} is not an admin command")

    async def stats(self) -> Stats:
        d = await asyncio.to_thread(self.engine.stats)
        return Stats(**{**d, "resident_models": tuple(d["resident_models"]),
                        "recent_swaps": tuple(d["recent_swaps"])})

    def model_info(self, name: str) -> ModelInfo | None:
        return self.engine.model_info(name)

    def holds_name(self, name: str) -> bool:
        return self.engine.holds_name(name)

    def tokenizer(self, model: str):
        return self.engine.tokenizer(model)

    def num_unfinished(self) -> int:
        return self.engine.num_unfinished()

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def home(self) -> str:
        return str(self.engine.config.home)

    def close(self) -> None:
        self.engine.shutdown()
