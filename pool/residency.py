"""Which models' weights are on the device, and the host model cache behind them.

A model's weights live once in host memory as one flat buffer in its device layout (pinned
on CUDA); making it resident is one bulk copy into a slab of the arena's weight region, after
evicting least-recently-used models that the step does not need. Weights are read-only, so
eviction only frees the slab. Host buffers are bounded too: past ``host_bytes`` the least
recently used non-resident ones are dropped and re-read from disk when needed again.

On CUDA the copy runs on its own stream and the compute stream waits on its event; on CPU the
same code path copies synchronously.

Prefetch (:meth:`WeightPool.prefetch`): while one model runs, the next one the policy expects
is copied into a free slab, or one freed by evicting the least recently used model other than
the running one, off the engine's critical path — on CUDA on the copy stream, on CPU by one
copy thread (``torch`` copies release the GIL). At most one prefetch is in flight. The model
counts as resident at once; the first :meth:`make_resident` that needs it waits only for the
rest of its copy (an event on CUDA, the copy's future on CPU) and reports that wait. A slab is
never reused while a copy into it may still run: evicting or unregistering a model waits for
its copy first.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gpupool.pool.arena import Arena
from gpupool.pool.weights import WeightLayout

logger = logging.getLogger(__name__)
RECENT_SWAPS = 20  # residency changes kept for stats()


class PoolCapacityError(ValueError):
    """A model (or a step's set of models) can never fit the arena."""


@dataclass(frozen=True)
class SwapIn:
    """One residency change: what was copied, what was evicted, how long the step waited.
    ``prefetched``: the copy was started earlier by :meth:`WeightPool.prefetch`, and
    ``seconds`` is only the wait for what was left of it."""

    model: str
    num_bytes: int
    seconds: float
    evicted: tuple[str, ...]
    prefetched: bool = False


@dataclass(eq=False)
class _Entry:
    layout: WeightLayout
    loader: Callable[[], torch.Tensor]  # re-reads the host buffer from disk
    host: torch.Tensor | None = None
    slab: int | None = None  # byte offset in the weight region when resident
    copy: object = None  # the prefetch copy into the slab (CUDA event or Future) until used
    on_evict: Callable[[], None] | None = None  # told when the slab is taken away


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class WeightPool:
    def __init__(self, arena: Arena, host_bytes: int):
        self.arena = arena
        self.host_bytes = host_bytes
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, oldest first
        self.device = arena.buffer.device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copier: ThreadPoolExecutor | None = None  # CPU prefetch copies (made lazily)
        self.num_swaps = 0  # copies a step waited for in full
        self.swap_bytes = 0
        self.swap_seconds = 0.0  # time steps waited for weights (whole copies, prefetch rests)
        self.num_prefetches = 0  # copies started ahead of need
        self.prefetch_hits = 0  # prefetched models a step then used
        self.prefetch_wasted = 0  # prefetched models evicted or removed before any use
        # the last residency changes, newest last (operators' status page): wall-clock time,
        # model, bytes, seconds waited, evicted models, prefetched
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT_SWAPS)
        # register() runs in the caller's thread while the engine thread makes models
        # resident: every method that reads or changes `entries` holds this lock
        self._lock = threading.RLock()

    @_locked
    def register(self, name: str, layout: WeightLayout, host: torch.Tensor,
                 loader: Callable[[], torch.Tensor],
                 on_evict: Callable[[], None] | None = None) -> None:
        """``on_evict()`` is called whenever the model loses its slab (its owner drops what it
        made from the views, e.g. packed copies of the weights)."""
        if layout.num_bytes > self.arena.weight_bytes:
            raise PoolCapacityError(
                f"model {name!r} needs {layout.num_bytes / 2**20:.1f} MiB of weights, but the "
                f"arena's weight region holds {self.arena.weight_bytes / 2**20:.1f} MiB; "
                "raise weight_bytes")
        self.entries[name] = _Entry(layout, loader, self._host_buffer(host),
                                    on_evict=on_evict)
        self._trim_host()

    @_locked
    def unregister(self, name: str) -> None:
        entry = self.entries.pop(name)
        if entry.slab is not None:
            self._release_slab(entry)

    def is_resident(self, name: str) -> bool:
        return self.entries[name].slab is not None

    @property
    def resident(self) -> list[str]:
        return [n for n, e in self.entries.items() if e.slab is not None]

    def views(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.entries[name]
        nbytes = entry.layout.num_bytes
        return entry.layout.views(self.arena.weights[entry.slab : entry.slab + nbytes])

    @_locked
    def make_resident(self, name: str, keep: frozenset[str] = frozenset()) -> SwapIn | None:
        """Copy ``name`` into a slab (evicting LRU models not in ``keep``); None if it was
        resident already (a prefetched model's first use is a SwapIn with ``prefetched``)."""
        entry = self.entries[name]
        self.entries.move_to_end(name)
        if entry.slab is not None:
            if entry.copy is None:
                return None
            start = time.perf_counter()
            self._wait(entry)
            seconds = time.perf_counter() - start
            self.prefetch_hits += 1
            self.swap_seconds += seconds
            return self._record(SwapIn(name, entry.layout.num_bytes, seconds, (),
                                       prefetched=True))
        start = time.perf_counter()
        if entry.host is None:  # re-read before taking a slab: a failed read holds none
            entry.host = self._host_buffer(entry.loader())
        slab, evicted = self._allocate(name, keep)
        if slab is None:
            raise PoolCapacityError(f"cannot make {name!r} resident beside {sorted(keep)}")
        try:
            self._copy(self.arena.weights[slab : slab + entry.layout.num_bytes], entry.host)
        except BaseException:
            self.arena.weight_slabs.free(slab)
            raise
        entry.slab = slab
        self._trim_host()
        seconds = time.perf_counter() - start
        self.num_swaps += 1
        self.swap_bytes += entry.layout.num_bytes
        self.swap_seconds += seconds
        return self._record(SwapIn(name, entry.layout.num_bytes, seconds, evicted))

    def _record(self, swap: SwapIn) -> SwapIn:
        self.recent.append({"time": time.time(), "model": swap.model, "bytes": swap.num_bytes,
                            "seconds": swap.seconds, "evicted": list(swap.evicted),
                            "prefetched": swap.prefetched})
        return swap

    @_locked
    def prefetch(self, name: str, protect: frozenset[str] = frozenset()) -> bool:
        """Start copying ``name`` into a slab without waiting for it, evicting least recently
        used models not in ``protect`` (the running model) if needed. Does nothing (False)
        when ``name`` is resident or unknown, its host buffer was dropped (re-reading it from
        disk is no job for the copy engine), another prefetch is still copying, or no slab
        can be had without evicting a protected model."""
        entry = self.entries.get(name)
        if entry is None or entry.slab is not None or entry.host is None:
            return False
        if any(e.copy is not None and not self._copy_done(e.copy) for e in self.entries.values()):
            return False
        slab, evicted = self._allocate(name, protect)
        if slab is None:
            return False
        if evicted:
            self._trim_host()
        dst = self.arena.weights[slab : slab + entry.layout.num_bytes]
        entry.copy = self._start_copy(dst, entry.host)
        entry.slab = slab
        self.entries.move_to_end(name)
        for keep in protect:  # the running model stays the most recently used
            if keep in self.entries:
                self.entries.move_to_end(keep)
        self.num_prefetches += 1
        self.swap_bytes += entry.layout.num_bytes
        return True

    def _allocate(self, name: str, keep: frozenset[str]) -> tuple[int | None, tuple[str, ...]]:
        """A slab for ``name``, evicting LRU resident models other than ``name`` and ``keep``
        until one fits; (None, ()) with nothing evicted if no such eviction makes it fit
        (free ranges are first fit, so fragmentation can stop it)."""
        nbytes = self.entries[name].layout.num_bytes
        plan = self.arena.weight_slabs.clone()  # evict on a copy first: all or nothing
        victims = []
        while plan.allocate(nbytes) is None:
            victim = next((n for n, e in self.entries.items() if e.slab is not None
                           and n != name and n not in keep and n not in victims), None)
            if victim is None:
                return None, ()
            plan.free(self.entries[victim].slab)
            victims.append(victim)
        for victim in victims:
            self._release_slab(self.entries[victim])
        return self.arena.weight_slabs.allocate(nbytes), tuple(victims)

    def _release_slab(self, entry: _Entry) -> None:
        if entry.copy is not None:  # prefetched, never used: let its copy finish first
            self.prefetch_wasted += 1
            try:
                self._wait(entry)
            except Exception:  # the slab is freed by _wait; the model was not in use
                logger.exception("a prefetch copy failed")
                return
        self.arena.weight_slabs.free(entry.slab)
        entry.slab = None
        if entry.on_evict is not None:
            entry.on_evict()

    def _start_copy(self, dst: torch.Tensor, src: torch.Tensor):
        if self._stream is None:
            if self._copier is None:
                # one intra-op thread: a second OpenMP team would slow the step loop's
                self._copier = ThreadPoolExecutor(1, thread_name_prefix="gpupool-prefetch",
                                                  initializer=torch.set_num_threads,
                                                  initargs=(1,))
            return self._copier.submit(dst.copy_, src)
        # the slab's last reader (an evicted model's step) must be done before it is
        # overwritten: the copy stream waits for the work queued on the compute stream
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    @staticmethod
    def _copy_done(copy) -> bool:
        return copy.done() if isinstance(copy, Future) else copy.query()

    def _wait(self, entry: _Entry) -> None:
        """Wait for ``entry``'s prefetch copy (CPU: its future; CUDA: its event, and the
        compute stream is ordered after it). If the copy failed, its slab is freed and the
        model is not resident (its views must never be bound to a half-written slab)."""
        copy, entry.copy = entry.copy, None
        try:
            if isinstance(copy, Future):
                copy.result()
            else:
                self._finish_cuda_copy(copy)
        except BaseException:
            self.arena.weight_slabs.free(entry.slab)
            entry.slab = None
            raise

    def _finish_cuda_copy(self, event) -> None:
        """The compute stream waits for the copy; so does the host, so that the time a step
        measures for its weights is the device's real stall (a step ends in a host sync for
        sampling anyway, so blocking here costs no overlap)."""
        torch.cuda.current_stream(self.device).wait_event(event)
        event.synchronize()

    def close(self) -> None:
        """Stop the CPU copy thread (after its copy, if one runs)."""
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None

    def _host_buffer(self, host: torch.Tensor) -> torch.Tensor:
        """Host buffers are pinned on CUDA so the swap-in copy runs at full bandwidth."""
        return host.pin_memory() if self.device.type == "cuda" else host

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._stream is None:
            dst.copy_(src)
        else:
            self._finish_cuda_copy(self._start_copy(dst, src))

    @_locked
    def _trim_host(self) -> None:
        """Drop host buffers of non-resident models, least recently used first, over the cap."""
        total = sum(e.host.numel() for e in self.entries.values() if e.host is not None)
        for name, e in self.entries.items():
            if total <= self.host_bytes:
                break
            if e.host is not None and e.slab is None:
                total -= e.host.numel()
                e.host = None
                logger.info("host cache: dropped %s (re-read from disk when needed)", name)

    @_locked
    def check_integrity(self) -> None:
        self.arena.check_integrity()
        slabs = [e.slab for e in self.entries.values() if e.slab is not None]
        assert len(slabs) == len(set(slabs)), "two models share a slab"
        assert len(slabs) == len(self.arena.weight_slabs._used), "a slab is owned by no model"
        assert all(e.slab is not None for e in self.entries.values() if e.copy is not None), (
            "a prefetch copy targets no slab")
