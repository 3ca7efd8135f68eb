"""Per-tenant limits, counted in Redis so every front end sharing it enforces one limit.

A tenant's record may carry ``limits``: ``max_concurrent_requests`` (API calls in flight),
``max_queued_requests`` (of those, the ones still waiting for their first token) and
``tokens_per_minute`` (prompt tokens counted when a call is admitted, generated tokens when it
ends, in fixed one-minute windows). Over a limit the call gets 429 with ``Retry-After``.

Keys (per tenant ``t``):
  gpupool:inflight:t     sorted set  call id -> expiry (unix s): calls in flight
  gpupool:queued:t       sorted set  call id -> expiry: calls without a first token yet
  gpupool:tpm:t:MINUTE   integer     tokens used in that minute (expires after two)

Admission is one Lua script (check every limit, then count the call): atomic, so two front
ends cannot both take the last slot. An entry expires after ``ENTRY_TTL_S`` in case the front
end that added it dies before it removes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

LIMIT_FIELDS = ("max_concurrent_requests", "max_queued_requests", "tokens_per_minute")
ENTRY_TTL_S = 3600
PREFIX = "gpupool:"

_ADMIT = """
local now, expiry = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_inflight, max_queued = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_tpm, tokens, id = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if max_inflight > 0 and redis.call('ZCARD', KEYS[1]) >= max_inflight then return 1 end
if max_queued > 0 and redis.call('ZCARD', KEYS[2]) >= max_queued then return 2 end
if max_tpm > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= max_tpm then return 3 end
redis.call('ZADD', KEYS[1], expiry, id)
redis.call('ZADD', KEYS[2], expiry, id)
redis.call('EXPIRE', KEYS[1], 2 * (expiry - now))
redis.call('EXPIRE', KEYS[2], 2 * (expiry - now))
redis.call('INCRBY', KEYS[3], tokens)
redis.call('EXPIRE', KEYS[3], 120)
return 0
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
    """Counts calls and tokens per tenant in Redis. Every method is one round trip."""

    def __init__(self, client):
        self.r = client
        self._admit = client.register_script(_ADMIT)

    @staticmethod
    def _minute_key(tenant: str, now: float) -> str:
        return f"{PREFIX}tpm:{tenant}:{int(now // 60)}"

    def admit(self, tenant: str, call_id: str, limits: dict, prompt_tokens: int
              ) -> Refusal | None:
        """Count the call, or the limit it would break (nothing counted then)."""
        now = time.time()
        code = int(self._admit(
            keys=[f"{PREFIX}inflight:{tenant}", f"{PREFIX}queued:{tenant}",
                  self._minute_key(tenant, now)],
            args=[now, now + ENTRY_TTL_S, limits.get("max_concurrent_requests") or 0,
                  limits.get("max_queued_requests") or 0,
                  limits.get("tokens_per_minute") or 0, prompt_tokens, call_id]))
        if code == 0:
            return None
        if code == 3:
            return Refusal("tokens_per_minute", max(1, int(60 - now % 60) + 1))
        return Refusal(LIMIT_FIELDS[code - 1], 1)

    def started(self, tenant: str, call_id: str) -> None:
        """The call has its first token: no longer queued."""
        self.r.zrem(f"{PREFIX}queued:{tenant}", call_id)

    def finished(self, tenant: str, call_id: str, completion_tokens: int) -> None:
        pipe = self.r.pipeline()
        pipe.zrem(f"{PREFIX}inflight:{tenant}", call_id)
        pipe.zrem(f"{PREFIX}queued:{tenant}", call_id)
        if completion_tokens:
            key = self._minute_key(tenant, time.time())
            pipe.incrby(key, completion_tokens)
            pipe.expire(key, 120)
        pipe.execute()

    def forget(self, tenant: str) -> None:
        """A deleted tenant's counters go with it (a call still running releases nothing)."""
        self.r.delete(f"{PREFIX}inflight:{tenant}", f"{PREFIX}queued:{tenant}")

    def usage(self, tenant: str) -> dict[str, int]:
        """In flight, queued and this minute's tokens (for the admin API and tests)."""
        now = time.time()
        pipe = self.r.pipeline()
        pipe.zcount(f"{PREFIX}inflight:{tenant}", now, "+inf")
        pipe.zcount(f"{PREFIX}queued:{tenant}", now, "+inf")
        pipe.get(self._minute_key(tenant, now))
        inflight, queued, tokens = pipe.execute()
        return {"requests_in_flight": inflight, "requests_queued": queued,
                "tokens_this_minute": int(tokens or 0)}
