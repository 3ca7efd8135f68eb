"""Tenants and keys: who is calling, and which models they may use.

Until the first tenant is created the server is open (everyone may use every model); from
then on (even after the last tenant is deleted) every
OpenAI route needs ``Authorization: Bearer <tenant key>``; under ``/tenants/{t}/v1`` the key
must be one of tenant ``t``'s. A model a tenant may not use is answered exactly like one that
does not exist (404), so tenants cannot probe each other's adapters.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

from fastapi import Request

from gpupool.api.errors import APIError, model_not_found


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...]
    limits: dict = field(default_factory=dict, compare=False)  # see api.limits
    share_prefix_cache: bool = False  # cached prompt KV shared with other tenants

    def cache_salt(self, request_salt: str | None) -> str | None:
        """The prefix cache namespace of this tenant's requests: its own unless it shares,
        plus the request's ``cache_salt``."""
        parts = ([] if self.share_prefix_cache else [f"tenant:{self.name}"]) + (
            [f"salt:{request_salt}"] if request_salt else [])
        return "|".join(parts) or None

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def _lookup(store, key: str | None, tenant_path: str | None) -> Tenant | None:
    if not store.auth_required():
        if tenant_path is not None:
            raise APIError(404, f"tenant {tenant_path!r} does not exist", code="not_found")
        return None
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    name = store.tenant_for_key(key)
    if name is None or (tenant_path is not None and name != tenant_path):
        raise _unauthorized("invalid API key")
    spec = store.tenant(name)
    if spec is None:  # deleted between the two reads
        raise _unauthorized("invalid API key")
    return Tenant(name, tuple(spec["models"]), dict(spec.get("limits") or {}),
                  bool(spec.get("share_prefix_cache")))


async def authenticate(state, request: Request, tenant_path: str | None) -> Tenant | None:
    """The calling tenant, or None when the server is open; 401 for a missing or bad key."""
    return await asyncio.to_thread(_lookup, state.store, bearer(request), tenant_path)


def check_model_access(state, tenant: Tenant | None, model: str) -> str | None:
    """``model``'s base (None for a base model); 404 if unknown or not the tenant's."""
    known = state.models.known()
    if model not in known or (tenant is not None and not tenant.may_use(model)):
        raise model_not_found(model)
    return known[model]


def _key_matches(key: str | None, expected: str | None) -> bool:
    return bool(key and expected) and hmac.compare_digest(key.encode(), expected.encode())


def check_metrics_access(state, request: Request) -> None:
    """``/metrics`` names tenants' models and adapters: once tenants exist it needs the
    metrics key or the admin key, unless the operator made it public."""
    config = state.config
    if config.public_metrics or not state.store.auth_required():
        return
    key = bearer(request)
    if not (_key_matches(key, config.metrics_key) or _key_matches(key, config.admin_key)):
        raise _unauthorized("/metrics needs the metrics key or the admin key "
                            "(or start the server with --public-metrics)")


def check_admin_enabled(state) -> None:
    """403 when the server has no admin key (the admin API and its status page are off)."""
    if not state.config.admin_key:
        raise APIError(403, "the admin API is disabled: start the server with --admin-key "
                            "or GPUPOOL_ADMIN_KEY", code="admin_disabled")


def check_admin(state, request: Request) -> None:
    check_admin_enabled(state)
    if not _key_matches(bearer(request), state.config.admin_key):
        raise _unauthorized("invalid admin key")
