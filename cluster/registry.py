"""Workers as the cluster sees them: each worker publishes a ``WorkerInfo`` heartbeat; readers
build ``WorkerView``s for routing and ``/admin/pool``, and tell dead workers from live ones
(heartbeat gone, or none of its connections left)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from gpupool.cluster import keys
from gpupool.scheduler.router import WorkerView


@dataclass
class WorkerInfo:
    name: str
    host: str = ""
    pid: int = 0
    device: str = ""
    weight_bytes: int = 0
    element_bytes: int = 0  # bytes per weight element in the worker's dtype
    kv_pages_total: int = 0
    kv_pages_free: int = 0
    resident: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # loaded (resident or not)
    running: int = 0
    queued: int = 0
    draining: bool = False
    step_s: float = 0.0  # recent step time (the slowest model's moving average)
    at: float = 0.0  # unix time of the heartbeat

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw) -> WorkerInfo:
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def view(self, alive: bool = True) -> WorkerView:
        return WorkerView(self.name, alive=alive, draining=self.draining,
                          resident=frozenset(self.resident), cached=frozenset(self.cached),
                          running=self.running, queued=self.queued,
                          weight_bytes=self.weight_bytes, element_bytes=self.element_bytes)


def connected_workers(r) -> set[str]:
    """Workers with at least one open connection to Redis (CLIENT LIST)."""
    prefix = keys.client_name("")
    out = set()
    for c in r.client_list():
        name = c.get("name") or ""
        if name.startswith(prefix):
            out.add(name[len(prefix):])
    return out


def read_workers(r) -> list[tuple[WorkerInfo, bool]]:
    """Every registered worker with whether it is alive: its heartbeat is current and it
    still has a connection open (a killed process loses its connections at once)."""
    names = sorted(n.decode() for n in r.smembers(keys.WORKERS))
    if not names:
        return []
    raws = r.mget([keys.worker_key(n) for n in names])
    connected = connected_workers(r)
    out = []
    for name, raw in zip(names, raws):
        if raw is None:
            out.append((WorkerInfo(name), False))
            continue
        info = WorkerInfo.from_json(raw)
        out.append((info, name in connected))
    return out


def forget(r, name: str) -> None:
    """Drop a dead worker from the registry (its inbox too: a restarted worker of the same
    name starts empty, and what the dead one held was moved by the gateways)."""
    pipe = r.pipeline()
    pipe.srem(keys.WORKERS, name)
    pipe.delete(keys.worker_key(name), keys.inbox(name))
    pipe.execute()


def heartbeat_age(info: WorkerInfo) -> float:
    return max(0.0, time.time() - info.at) if info.at else float("inf")
