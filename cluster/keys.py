"""Redis keys of a cluster (all under ``gpupool:cluster:``):

  workers            set     names of workers ever registered (dead ones are dropped)
  worker:{name}      string  the worker's heartbeat: JSON of ``registry.WorkerInfo``; expires
                             (PX) after the heartbeat TTL, so a lost node disappears
  in:{name}          stream  messages to a worker (field ``msg``: an EngineRequest, Abort,
                             RemoveModel or RemoveAdapter as codec JSON), read through the
                             consumer group ``engine``; a request is acknowledged (XACK) when
                             it ends, so what a dead worker held is what it never acked
  out:{request id}   stream  the request's OutputDelta messages (field ``msg``), capped in
                             length and expiring, read by the gateway holding the HTTP call
  reader:{request id} string set (expiring) by the gateway reading the request: a worker
                             aborts a request whose reader is gone (a dead gateway)
  fence:{request id} string  the request's current placement epoch (expiring), raised by a
                             gateway that moves it: a worker holding an older placement
                             aborts it, and its deltas (field ``epoch``) are dropped

What the cluster serves lives in the API state store's own hashes, ``gpupool:models`` (name ->
{"path", "ttft_ms", "tbt_ms"}) and ``gpupool:adapters`` (name -> {"base", "path"}), so a model
registered on one gateway (flag, config file or admin API) is known to every gateway and
worker.
  redispatched       counter requests moved to another worker after theirs died
  fenced             counter deltas gateways dropped because a newer placement fenced them

A worker's connections are named ``gpupool-worker:{name}`` (CLIENT SETNAME), so a process
that dies is seen at once in CLIENT LIST, before its heartbeat expires.
"""

from __future__ import annotations

PREFIX = "gpupool:cluster:"
WORKERS = PREFIX + "workers"
MODELS = "gpupool:models"  # the state store's hashes (api/state.py)
ADAPTERS = "gpupool:adapters"
REDISPATCHED = PREFIX + "redispatched"
FENCED = PREFIX + "fenced"
GROUP = "engine"
OUT_MAXLEN = 10_000  # deltas kept per request stream (a request's tokens, with room)
OUT_TTL_S = 600  # an output stream outlives its request by this long


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def inbox(name: str) -> str:
    return f"{PREFIX}in:{name}"


def outbox(request_id: str) -> str:
    return f"{PREFIX}out:{request_id}"


def reader(request_id: str) -> str:
    return f"{PREFIX}reader:{request_id}"


def fence(request_id: str) -> str:
    return f"{PREFIX}fence:{request_id}"


READER_TTL_S = 5.0  # a request nobody has read for this long is aborted by its worker


def client_name(worker: str) -> str:
    return f"gpupool-worker:{worker}"
