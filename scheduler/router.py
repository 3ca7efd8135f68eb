"""Which worker takes a request, in a pool of engines (one per device). Pure Python: the
gateway routes with it over the workers Redis tells it about, and the cluster simulation
places requests with the same object.

Preference, for a request of base model ``m`` (and adapter ``a``, if any):
  1. a worker where ``m`` is resident and ``a`` is in a device slot, least loaded first;
  2. a worker where ``m`` is resident and ``a`` in its host cache (read once already);
  3. a worker where ``m`` is resident, least loaded first;
  4. a worker whose host cache holds ``m`` (a copy away), least loaded first;
  5. the least loaded worker whose weight region can hold ``m`` at all.
A worker counts as overloaded when its queue (waiting requests) reaches ``max_queue``: then
the next tier is tried, so a model whose load outgrows one worker is served by a second.
Every tier also passes over a worker whose load exceeds the least loaded one's (of those that
can hold the model) by ``spread`` or more, so the load spreads before any queue builds (a
worker runs its batch's rows together: more of them, slower steps for each): a hot base model
or adapter is then served by a second worker, which loads it once and from then on holds it.
Load is running + queued requests, plus what this router sent since the worker's last report
(so a burst between two heartbeats is spread, not piled on one worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerView:
    """What the router knows of one worker (from its last heartbeat)."""

    name: str
    alive: bool = True
    draining: bool = False  # takes no new work (SIGTERM)
    resident: frozenset[str] = frozenset()  # models whose weights are in the arena
    cached: frozenset[str] = frozenset()  # models in the host cache
    adapters: frozenset[str] = frozenset()  # adapters in device slots
    host_adapters: frozenset[str] = frozenset()  # adapters read into the host cache
    running: int = 0
    queued: int = 0
    weight_bytes: int = 0  # the weight region's size (0: unknown, no limit checked)
    element_bytes: int = 0  # bytes per weight element in its dtype (0: unknown)
    tensor_parallel: int = 1  # ranks sharing each model (weight_bytes: each rank's region)
    sent: int = field(default=0, compare=False)  # routed here since the last report

    @property
    def load(self) -> int:
        return self.running + self.queued + self.sent


def fits_weights(w: WorkerView, model_params: int, element_bytes: float = 0) -> bool:
    """Whether the worker's weight region can hold the model (unknown sizes: assume so);
    ``element_bytes``: the model's own bytes per weight (its dtype or int8), 0: the worker's.
    A tensor-parallel worker holds a shard a rank, each in a region of ``weight_bytes``: its
    share of the model's bytes (the norms it replicates are a rounding error)."""
    eb = element_bytes or w.element_bytes
    if not model_params or not w.weight_bytes or not eb:
        return True
    return model_params * eb / max(w.tensor_parallel, 1) <= w.weight_bytes


def too_large(model: str, model_params: int, workers: list[WorkerView],
              element_bytes: float = 0) -> str:
    """The message for a model no worker's weight region can hold."""
    best = max(workers, key=lambda w: w.weight_bytes)
    need = model_params * (element_bytes or best.element_bytes or 2)
    return (f"model {model!r} needs about {need / 2**30:.2f} GiB of weights, more than any "
            f"worker's weight region (largest {best.weight_bytes / 2**30:.2f} GiB, on "
            f"{best.name}, {best.tensor_parallel} rank(s)); a worker with more ranks "
            "(--tensor-parallel N) shards it")


class NoWorker(Exception):
    """No live worker can take the request; the message says why."""


@dataclass(frozen=True)
class Route:
    worker: str
    reason: str  # adapter | adapter-cached | resident | cached | load


class Router:
    def __init__(self, max_queue: int = 16, spread: int = 8):
        if max_queue < 1 or spread < 1:
            raise ValueError("max_queue and spread must be >= 1")
        self.max_queue = max_queue
        self.spread = spread

    def route(self, model: str, workers: list[WorkerView], model_params: int = 0,
              exclude: frozenset[str] = frozenset(), element_bytes: float = 0,
              adapter: str | None = None, degree: int | None = None,
              refusal=None) -> Route:
        """The worker for a request of base model ``model`` (``model_params``: its weight
        elements, 0 if unknown; ``element_bytes``: the model's own bytes per element, 0: each
        worker's; ``adapter``: the request's adapter, if any); ``exclude``: workers not to
        use (one that just failed it); ``degree``: only workers of that many tensor-parallel
        ranks (a request moved from a dead worker: other degrees add the ranks' partial sums
        otherwise, so its continuation could differ); ``refusal(degree)``: why a worker of
        that many ranks cannot shard the model (None: it can)."""
        live = [w for w in workers if w.alive and not w.draining and w.name not in exclude]
        if degree is not None:
            live = [w for w in live if w.tensor_parallel == degree]
        if refusal is not None and live:
            why = {w.tensor_parallel: refusal(w.tensor_parallel) for w in live}
            if all(why.values()):
                raise NoWorker(next(iter(why.values())))
            live = [w for w in live if not why[w.tensor_parallel]]
        if not live:
            raise NoWorker("no live worker in the pool" if degree is None else
                           f"no live worker of {degree} tensor-parallel rank(s) in the pool")
        fits = [w for w in live if fits_weights(w, model_params, element_bytes)]
        if not fits:
            raise NoWorker(too_large(model, model_params, live, element_bytes))
        least = min(w.load for w in fits)
        near = [w for w in fits if w.load - least < self.spread]  # not far above the least
        resident = [w for w in near if model in w.resident]
        tiers = [("resident", resident), ("cached", [w for w in near if model in w.cached])]
        if adapter is not None:
            tiers[:0] = [("adapter", [w for w in resident if adapter in w.adapters]),
                         ("adapter-cached", [w for w in resident if adapter in w.host_adapters])]
        for reason, tier in tiers:
            ok = [w for w in tier if w.queued + w.sent < self.max_queue]
            if ok:
                return self._pick(ok, reason)
        return self._pick(fits, "load")

    @staticmethod
    def _pick(workers: list[WorkerView], reason: str) -> Route:
        best = min(workers, key=lambda w: (w.load, w.name))
        best.sent += 1
        return Route(best.name, reason)
