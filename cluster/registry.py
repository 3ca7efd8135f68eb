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
    ttl_s: float = 0.0  # how long the heartbeat key lives
    kv_capacity: dict = field(default_factory=dict)  # loaded model -> most tokens a request
    adapters: list[str] = field(default_factory=list)  # in device slots
    host_adapters: list[str] = field(default_factory=list)  # read into the host cache
    tensor_parallel: int = 1  # ranks sharing each model (weight_bytes: each rank's region)

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
                          weight_bytes=self.weight_bytes, element_bytes=self.element_bytes,
                          adapters=frozenset(self.adapters),
                          host_adapters=frozenset(self.host_adapters),
                          tensor_parallel=self.tensor_parallel)


def read_workers(r) -> list[tuple[WorkerInfo, bool]]:
    """Every registered worker with whether it is alive: its heartbeat is current and it
    still has a connection open (a killed process loses its connections at once)."""
    names = sorted(n.decode() for n in r.smembers(keys.WORKERS))
    if not names:
        return []
    raws = r.mget([keys.worker_key(n) for n in names])
    return _alive(names, raws, _connected(r.client_list()))


async def read_workers_async(ar) -> list[tuple[WorkerInfo, bool]]:
    """:func:`read_workers` on an asyncio client."""
    names = sorted(n.decode() for n in await ar.smembers(keys.WORKERS))
    if not names:
        return []
    raws = await ar.mget([keys.worker_key(n) for n in names])
    return _alive(names, raws, _connected(await ar.client_list()))


def _connected(clients) -> set[str]:
    prefix = keys.client_name("")
    names = (c.get("name") or "" for c in clients)
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def _alive(names, raws, connected) -> list[tuple[WorkerInfo, bool]]:
    out = []
    for name, raw in zip(names, raws):
        if raw is None:
            out.append((WorkerInfo(name), False))
            continue
        info = WorkerInfo.from_json(raw)
        out.append((info, name in connected))
    return out


def heartbeat_age(info: WorkerInfo) -> float | None:
    """Seconds since the worker's last heartbeat; None when it has none (expired)."""
    return max(0.0, time.time() - info.at) if info.at else None
