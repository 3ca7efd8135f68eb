"""Redis connections of the pool, and riding out a Redis that stalls or restarts.

Every connection has explicit timeouts (redis-py's defaults changed between releases: 5 s in
8.x, none before), so a stalled server is an error after ``SOCKET_TIMEOUT_S``, not a hang.
Commands are not retried by redis-py itself: a timed-out XADD may have been applied, so the
callers retry where a repeat is harmless (deltas carry token indexes, a worker ignores a
request it already holds) with backoff and jitter (:class:`Outage`).
"""

from __future__ import annotations

import random
import re
import time

import redis
import redis.asyncio as aredis

SOCKET_TIMEOUT_S = 2.0  # longer than any BLOCK the pool uses (100 ms)
CONNECT_TIMEOUT_S = 2.0
OUTAGE_LIMIT_S = 30.0  # default: how long streams pause for an unreachable Redis
HEALTH_CHECK_S = 5  # a connection idle this long is pinged before use


_OPTIONS = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "health_check_interval": HEALTH_CHECK_S}


def client(url: str, **kw) -> redis.Redis:
    return redis.Redis.from_url(url, **_OPTIONS, **kw)


def async_client(url: str, **kw) -> aredis.Redis:
    return aredis.Redis.from_url(url, **_OPTIONS, **kw)


def redact(text: str) -> str:
    """``text`` with the password of every Redis URL in it replaced by ``***``."""
    return re.sub(r"(rediss?|unix)://([^:@/\s]*):([^@\s]+)@", r"\1://\2:***@", str(text))


class Outage:
    """When Redis stopped answering (None: it answers), when it came back, and the waits
    between tries (exponential from 50 ms to 1 s, with full jitter)."""

    def __init__(self, limit_s: float = OUTAGE_LIMIT_S):
        self.limit_s = limit_s
        self.since: float | None = None
        self.back_at = 0.0  # monotonic time Redis answered again after an outage
        self.tries = 0

    def failed(self) -> float:
        """Note a failed call; the seconds to wait before the next try. Raises
        :class:`OutageTooLong` past the limit."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if now - self.since > self.limit_s:
            raise OutageTooLong(f"the cluster's Redis has been unavailable for more than "
                                f"{self.limit_s:g} s")
        self.tries += 1
        return random.uniform(0, min(1.0, 0.05 * 2 ** min(self.tries, 5)))

    def ok(self) -> None:
        if self.since is not None:
            self.since = None
            self.back_at = time.monotonic()
        self.tries = 0

    def recent(self, within_s: float) -> bool:
        """Redis is away now, or came back less than ``within_s`` ago: keys that expired
        meanwhile (heartbeats, reader leases) say nothing about their owners yet."""
        return self.since is not None or time.monotonic() - self.back_at < within_s


class OutageTooLong(redis.ConnectionError):
    """Redis stayed unavailable past the outage limit."""
