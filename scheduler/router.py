"""Which worker takes a request, in a pool of engines (one per device). Pure Python: the
gateway routes with it over the workers Redis tells it about, and the cluster simulation
places requests with the same object.

Preference, for a request of base model ``m`` (an adapter follows its base):
  1. a worker where ``m`` is resident (its weights in the arena), least loaded first;
  2. a worker whose host cache holds ``m`` (a copy away), least loaded first;
  3. the least loaded worker whose weight region can hold ``m`` at all.
A worker counts as overloaded when its queue (waiting requests) reaches ``max_queue``: then
the next tier is tried, so a model whose load outgrows one worker is served by a second.
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
    running: int = 0
    queued: int = 0
    weight_bytes: int = 0  # the weight region's size (0: unknown, no limit checked)
    sent: int = field(default=0, compare=False)  # routed here since the last report

    @property
    def load(self) -> int:
        return self.running + self.queued + self.sent


class NoWorker(Exception):
    """No live worker can take the request; the message says why."""


@dataclass(frozen=True)
class Route:
    worker: str
    reason: str  # resident | cached | load


class Router:
    def __init__(self, max_queue: int = 16):
        self.max_queue = max_queue

    def route(self, model: str, workers: list[WorkerView], model_bytes: int = 0,
              exclude: frozenset[str] = frozenset()) -> Route:
        """The worker for a request of base model ``model`` (``model_bytes``: its weights,
        0 if unknown); ``exclude``: workers not to use (one that just failed it)."""
        live = [w for w in workers if w.alive and not w.draining and w.name not in exclude]
        if not live:
            raise NoWorker("no live worker in the pool")
        fits = [w for w in live if not model_bytes or not w.weight_bytes
                or model_bytes <= w.weight_bytes]
        if not fits:
            biggest = max(w.weight_bytes for w in live)
            raise NoWorker(f"model {model!r} needs {model_bytes} bytes of weights, more than "
                           f"any worker's weight region (largest {biggest} bytes); no tensor "
                           "parallelism yet")
        for reason, tier in (("resident", [w for w in fits if model in w.resident]),
                             ("cached", [w for w in fits if model in w.cached])):
            ok = [w for w in tier if w.queued + w.sent < self.max_queue]
            if ok:
                return self._pick(ok, reason)
        return self._pick(fits, "load")

    @staticmethod
    def _pick(workers: list[WorkerView], reason: str) -> Route:
        best = min(workers, key=lambda w: (w.load, w.name))
        best.sent += 1
        return Route(best.name, reason)
