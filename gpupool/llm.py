"""``Engine``: wires the pool, the models and the scheduler, and runs the loop in a thread.

    engine = Engine(device="cpu")
    engine.add_model("smollm2", "smollm2")
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import psutil
import torch

from gpupool import kernels
from gpupool.config import Config
from gpupool.default_model import DEFAULT_MODEL, ensure_default_model
from gpupool.models.errors import ModelLoadError
from gpupool.models.worker import ModelWorker
from gpupool.pool.arena import Arena
from gpupool.pool.kv import KVStorage
from gpupool.pool.residency import WeightPool
from gpupool.engine.core import EngineCore
from gpupool.messages.params import SamplingParams
from gpupool.scheduler.request import RequestError, RequestOutput
from gpupool.scheduler.slo import SLO

logger = logging.getLogger(__name__)


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
    return min(2 << 30, int(free_bytes(device) * 0.2))


def default_weight_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(free_bytes(device) * 0.4)
    return min(8 << 30, int(free_bytes(device) * 0.3))


def worker_weight_bytes(pool: WeightPool, name: str) -> int:
    entry = pool.entries.get(name)
    return entry.layout.num_bytes if entry is not None else 0


class Engine:
    """Many models, one KV pool, continuous batching; thread-safe public methods."""

    def __init__(self, device: str = "auto", config: Config | None = None, **overrides):
        self.config = config or Config.from_env(device=device, **overrides)
        self.device = resolve_device(self.config.device)
        kernels.set_kernel_mode(self.config.kernels)
        pool = self.config.pool
        kv_bytes = pool.kv_cache_bytes or default_kv_bytes(self.device)
        num_pages = kv_bytes // pool.kv_page_bytes
        self.arena = Arena(pool.weight_bytes or default_weight_bytes(self.device),
                           pool.adapter_bytes, num_pages * pool.kv_page_bytes, self.device)
        self.kv = KVStorage(num_pages, pool.kv_page_bytes, self.device, self.arena.kv)
        self.kv.enable_host_swap(pool.host_kv_bytes // pool.kv_page_bytes)
        host_bytes = pool.host_cache_bytes or int(psutil.virtual_memory().available * 0.5)
        self.weights = WeightPool(self.arena, host_bytes)
        self.core = EngineCore(self.config.scheduler, self.kv.pages, self.kv,
                               prefetch=pool.prefetch)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._loading: set[str] = set()  # model names being read from disk
        self._aborts: collections.deque[str] = collections.deque()  # applied by the loop
        logger.info("engine on %s: %d KV pages of %d KiB", self.device,
                    self.kv.pages.num_pages, pool.kv_page_bytes // 1024)

    # ---- models ---------------------------------------------------------------------------
    def resolve_model_path(self, path: str | Path) -> Path:
        if str(path) == DEFAULT_MODEL:
            return ensure_default_model(self.config.home)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: model folder does not exist")
        return folder

    def add_model(self, name: str, path: str | Path = DEFAULT_MODEL, slo: SLO | None = None):
        """Load a model folder (or ``"smollm2"``) and serve it as ``name`` (with its own
        latency objectives, else the config's defaults)."""
        with self._lock:
            if name in self.core.workers or name in self._loading:
                raise RequestError(f"model {name!r} is already loaded")
            if name in self.core.adapters.refs:
                raise RequestError(f"{name!r} is already the name of an adapter")
            self._loading.add(name)  # a concurrent add of the same name fails above
        try:
            worker = ModelWorker(name, self.resolve_model_path(path), self.device, self.kv,
                                 self.config.dtype, self.config.adapters, self.weights)
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

    def remove_model(self, name: str) -> None:
        """Refuse new requests for ``name`` now; running ones finish, then it is dropped."""
        with self._lock:
            self.core.remove_model(name)

    def add_adapter(self, name: str, base: str, path: str | Path) -> None:
        """Serve the PEFT LoRA adapter in folder ``path`` as ``name``, on loaded ``base``."""
        with self._lock:
            self.core.add_adapter(name, base, str(Path(path).expanduser()))

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
            return {n: r.base for n, r in self.core.adapters.refs.items()
                    if n not in self.core.adapters.removing}

    def has_model(self, name: str) -> bool:
        """Whether ``name`` (a base model or an adapter) takes requests now. Reads without the
        engine lock (a step may hold it for a while): a snapshot, as any answer would be."""
        try:
            self.core.resolve(name)
        except (RequestError, KeyError):
            return False
        return True

    def holds_name(self, name: str) -> bool:
        """Whether a model or adapter of this name is loaded, one being removed (draining its
        running requests) included; a snapshot read without the lock."""
        return name in self.core.workers or name in self.core.adapters.refs

    def context_limit(self, model: str) -> int:
        """Most tokens (prompt + output) one request for ``model`` may hold: the model's
        context window, or the KV pool's capacity in that model's tokens if smaller."""
        worker = self.core.workers[self.core.resolve(model)[0]]
        return min(worker.cfg.max_model_len, self.kv.pages.num_pages * worker.block_tokens)

    def num_unfinished(self) -> int:
        """Requests queued or running, over all models (a snapshot, read without the lock)."""
        return len(self.core.requests)

    def submit(self, prompts: Sequence[str | list[int]], params: Sequence[SamplingParams],
               model: str | Sequence[str], sinks: Sequence,
               tenant: str | None = None) -> list[str]:
        """Queue several requests at once, or none: each is tokenised and checked first
        (RequestError names the first bad one). ``model``: one name, or one per prompt;
        ``tenant``: who asks (the scheduler shares batch slots fairly between tenants).
        One lock acquisition."""
        names = [model] * len(prompts) if isinstance(model, str) else list(model)
        if len(names) != len(prompts):
            raise RequestError("give one model name, or one per prompt")
        with self._lock:
            checked = []
            for prompt, p, name in zip(prompts, params, names):
                ids = self.core.tokenize(name, prompt)
                self.core.check_request(name, ids, p)
                checked.append(ids)
            rids: list[str] = []
            try:
                for ids, p, name, sink in zip(checked, params, names, sinks):
                    rids.append(self.core.add_request(name, ids, p, sink=sink,
                                                      tenant=tenant))
            except BaseException:
                for rid in rids:  # all or none
                    self.core.abort(rid)
                raise
            self._ensure_thread()
            self._lock.notify()
        return rids

    def stats(self) -> dict:
        """A snapshot of the pool for operators: arena regions, resident models and adapters,
        KV pages, swaps, queue depth per model (plain ints, floats and strings)."""
        with self._lock:
            arena, kv, w = self.arena, self.kv, self.weights
            sched = self.core.scheduler
            weight_used = arena.weight_bytes - arena.weight_slabs.num_free_bytes
            host = kv.host_pages
            models = {}
            for name, worker in self.core.workers.items():
                slots = worker.slots
                models[name] = {
                    "resident": w.is_resident(name) if name in w.entries else True,
                    "weight_bytes": worker_weight_bytes(w, name),
                    "removing": name in self.core.removing_models,
                    "waiting": len(sched.waiting.get(name, ())),
                    "running": len(sched.running.get(name, ())),
                    "adapter_slots": slots.num_slots if slots is not None else 0,
                    "resident_adapters": list(slots.resident) if slots is not None else [],
                }
            return {
                "device": str(self.device),
                "policy": self.config.scheduler.policy,
                "arena": {
                    "total_bytes": arena.num_bytes,
                    "weights": {"bytes": arena.weight_bytes, "used_bytes": weight_used},
                    "adapters": {"bytes": arena.adapter_bytes},
                    "kv": {"bytes": arena.kv_bytes},
                },
                "kv_pages": {
                    "page_bytes": kv.page_bytes,
                    "total": kv.pages.num_pages,
                    "used": kv.pages.num_used_pages,
                    "free": kv.pages.num_free_pages,
                    "host_total": host.num_pages if host is not None else 0,
                    "host_used": host.num_used_pages if host is not None else 0,
                },
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
                "models": models,
                "adapters": {n: r.base for n, r in self.core.adapters.refs.items()},
                "requests": len(self.core.requests),
            }

    def tokenizer(self, model: str):
        return self.core.workers[self.core.resolve(model)[0]].tokenizer

    def tokenize(self, model: str, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids for ``model``, checked (RequestError if empty, untokenizable
        or out of the vocabulary); read without the engine lock, as ``tokenizer`` is."""
        return self.core.tokenize(model, prompt)

    # ---- requests -------------------------------------------------------------------------
    def _model_name(self, model: str | None) -> str:
        if model is not None:
            return model
        if len(self.core.workers) != 1:
            raise RequestError("name the model: the engine serves "
                               f"{len(self.core.workers)} models")
        return next(iter(self.core.workers))

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    model: str | None = None, request_id: str | None = None,
                    sink=None) -> str:
        """Queue a request; ``sink(RequestOutput)`` is called from the engine thread."""
        with self._lock:
            rid = self.core.add_request(self._model_name(model), prompt,
                                        params or SamplingParams(), request_id, sink)
            self._ensure_thread()
            self._lock.notify()
        return rid

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

    def generate(self, prompts: str | list[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 model: str | list[str] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one final output per prompt, in order.

        ``model`` names a base model or an adapter, or is a list with one name per prompt,
        so one call can mix bases and adapters. Every prompt is checked before any is
        queued, so a bad one raises RequestError and nothing of the call runs.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError("give one SamplingParams, or one per prompt")
        plist = [p or SamplingParams() for p in plist]
        done = threading.Event()
        results: dict[int, RequestOutput] = {}

        def sink_for(i):
            def sink(out: RequestOutput):
                if out.finished:
                    results[i] = out
                    if len(results) == len(prompts):
                        done.set()
            return sink

        if not isinstance(model, (list, tuple)):
            model = self._model_name(model)
        self.submit(prompts, plist, model, [sink_for(i) for i in range(len(prompts))])
        done.wait()
        return [results[i] for i in range(len(prompts))]

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     model: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; leaving early aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        def sink(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                if not loop.is_closed():
                    raise

        rid = self.add_request(prompt, params, model, request_id, sink=sink)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    # ---- the loop -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpupool-engine",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self.core.has_work():
                    self._lock.wait()
                if self._stopped:
                    return
                try:
                    self._apply_aborts()
                    self.core.step()
                except Exception as e:  # never lose the loop: fail what was in flight
                    logger.exception("engine step failed; failing its requests")
                    self.core.fail_all(f"engine error: {e}")
            time.sleep(0)  # let a thread waiting for the lock (a new request) take it now

    @property
    def alive(self) -> bool:
        """False once the engine loop has stopped (shutdown)."""
        return not self._stopped and (self._thread is None or self._thread.is_alive())

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
