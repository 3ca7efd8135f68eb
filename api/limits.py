"""Per-tenant limits, counted in Redis so every front end sharing it enforces one limit.

A tenant's record may carry ``limits``: ``max_concurrent_requests`` (API calls in flight),
``max_queued_requests`` (of those, the ones still waiting for their first token) and
``tokens_per_minute`` (prompt tokens counted when a call is admitted, generated tokens when it
ends, in fixed one-minute windows). Over a limit the call gets 429 with ``Retry-After``.

Keys (per tenant ``t``):
  gpupool:inflight:t     sorted set  call id -> lease expiry (Redis's clock, unix s)
  gpupool:queued:t       sorted set  call id -> lease expiry: calls without a first token yet
  gpupool:tpm:t:MINUTE   integer     tokens used in that minute (expires after two)

Admission is one Lua script (check every limit, then count the call): atomic, so two front
ends cannot both take the last slot. An entry is a lease of ``LEASE_S`` that its front end
renews every third of it while the call lives (one script a tenant, timed by Redis's own
clock: ``TIME`` in the script, so front ends with skewed clocks agree), so the slots of a
front end that died, or whose entries a Redis restart left behind, are free within a lease.
Every method but :meth:`TenantLimiter.admit` swallows Redis errors (logged): a call that
could not be released is released by its lease.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

logger = logging.getLogger(__name__)

LIMIT_FIELDS = ("max_concurrent_requests", "max_queued_requests", "tokens_per_minute")
LEASE_S = 10.0
PREFIX = "gpupool:"

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

_ADMIT = _NOW + """
local expiry = now + tonumber(ARGV[1])
local max_inflight, max_queued = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_tpm, tokens, id = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if max_inflight > 0 and redis.call('ZCARD', KEYS[1]) >= max_inflight then return 1 end
if max_queued > 0 and redis.call('ZCARD', KEYS[2]) >= max_queued then return 2 end
if max_tpm > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= max_tpm then return 3 end
redis.call('ZADD', KEYS[1], expiry, id)
redis.call('ZADD', KEYS[2], expiry, id)
redis.call('EXPIRE', KEYS[1], math.ceil(2 * tonumber(ARGV[1])))
redis.call('EXPIRE', KEYS[2], math.ceil(2 * tonumber(ARGV[1])))
redis.call('INCRBY', KEYS[3], tokens)
redis.call('EXPIRE', KEYS[3], 120)
return 0
"""

# renew the leases of the call ids in ARGV[2..] that are still held (XX: never re-adds one)
_RENEW = _NOW + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', expiry, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(2 * tonumber(ARGV[1])))
redis.call('EXPIRE', KEYS[2], math.ceil(2 * tonumber(ARGV[1])))
return 0
"""

_USAGE = _NOW + """
return {redis.call('ZCOUNT', KEYS[1], now, '+inf'), redis.call('ZCOUNT', KEYS[2], now, '+inf')}
"""


def limits_view(limits: dict | None) -> dict[str, int | None]:
    """A stored tenant's limits with every known field (None: no limit). They were checked
    where they came in: the admin API's body model or the config file's ``TenantSpec``."""
    return {name: (limits or {}).get(name) for name in LIMIT_FIELDS}


@dataclass(frozen=True)
class Refusal:
    limit: str
    retry_after_s: int


class TenantLimiter:
    """Counts calls and tokens per tenant in Redis, and renews the leases of the calls this
    front end holds (a daemon thread, started with the first)."""

    def __init__(self, client, lease_s: float = LEASE_S):
        self.r = client
        self.lease_s = lease_s
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._usage = client.register_script(_USAGE)
        self._held: dict[str, set[str]] = {}  # tenant -> call ids this front end holds
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _keys(tenant: str) -> list[str]:
        return [f"{PREFIX}inflight:{tenant}", f"{PREFIX}queued:{tenant}"]

    @staticmethod
    def _minute_key(tenant: str, now: float) -> str:
        return f"{PREFIX}tpm:{tenant}:{int(now // 60)}"

    def admit(self, tenant: str, call_id: str, limits: dict, prompt_tokens: int
              ) -> Refusal | None:
        """Count the call, or the limit it would break (nothing counted then)."""
        now = time.time()
        code = int(self._admit(
            keys=[*self._keys(tenant), self._minute_key(tenant, now)],
            args=[self.lease_s, limits.get("max_concurrent_requests") or 0,
                  limits.get("max_queued_requests") or 0,
                  limits.get("tokens_per_minute") or 0, prompt_tokens, call_id]))
        if code == 0:
            with self._lock:
                self._held.setdefault(tenant, set()).add(call_id)
                if self._renewer is None:
                    self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                                     name="gpupool-limit-leases")
                    self._renewer.start()
            return None
        if code == 3:
            return Refusal("tokens_per_minute", max(1, int(60 - now % 60) + 1))
        return Refusal(LIMIT_FIELDS[code - 1], 1)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._lock:
                held = {t: list(ids) for t, ids in self._held.items() if ids}
            for tenant, ids in held.items():
                try:
                    self._renew(keys=self._keys(tenant), args=[self.lease_s, *ids])
                except redis.RedisError as e:  # renewed next time, or the lease runs out
                    logger.warning("could not renew %d limit leases of %s: %s", len(ids),
                                   tenant, e)

    def close(self) -> None:
        self._stop.set()

    def started(self, tenant: str, call_id: str) -> None:
        """The call has its first token: no longer queued."""
        try:
            self.r.zrem(f"{PREFIX}queued:{tenant}", call_id)
        except redis.RedisError as e:
            logger.warning("limits of %s: %s", tenant, e)

    def finished(self, tenant: str, call_id: str, completion_tokens: int) -> None:
        with self._lock:
            self._held.get(tenant, set()).discard(call_id)
        try:
            pipe = self.r.pipeline()
            pipe.zrem(f"{PREFIX}inflight:{tenant}", call_id)
            pipe.zrem(f"{PREFIX}queued:{tenant}", call_id)
            if completion_tokens:
                key = self._minute_key(tenant, time.time())
                pipe.incrby(key, completion_tokens)
                pipe.expire(key, 120)
            pipe.execute()
        except redis.RedisError as e:  # its lease frees the slot
            logger.warning("limits of %s: call %s not released now (%s); its lease ends "
                           "within %g s", tenant, call_id, e, self.lease_s)

    def forget(self, tenant: str) -> None:
        """A deleted tenant's counters go with it (a call still running releases nothing)."""
        with self._lock:
            self._held.pop(tenant, None)
        self.r.delete(*self._keys(tenant))

    def usage(self, tenant: str) -> dict[str, int]:
        """In flight, queued and this minute's tokens (for the admin API and tests)."""
        inflight, queued = self._usage(keys=self._keys(tenant))
        tokens = self.r.get(self._minute_key(tenant, time.time()))
        return {"requests_in_flight": int(inflight), "requests_queued": int(queued),
                "tokens_this_minute": int(tokens or 0)}
