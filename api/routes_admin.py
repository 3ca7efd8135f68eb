"""Admin API (``Authorization: Bearer <admin key>``): models, adapters, tenants, the pool."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gpupool.api import openapi as doc
from gpupool.api.auth import check_admin
from gpupool.api.errors import APIError
from gpupool.api.limits import limits_view
from gpupool.api.models import check_name
from gpupool.api.protocol import validate
from gpupool.api.state import hash_key, new_key
from gpupool.api.util import read_json


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelBody(_Body):
    name: str
    path: str
    ttft_ms: float | None = Field(None, gt=0)
    tbt_ms: float | None = Field(None, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    quantization: Literal["int8", "int4", "int4-g32", "int4-g64", "int4-g128", "none"] | None = None
    reasoning_parser: Literal["qwen3", "deepseek_r1", "gpt_oss"] | None = None
    task: Literal["generate", "embed"] = "generate"


class AdapterBody(_Body):
    name: str
    base: str
    path: str
    replace: bool = False  # an adapter of that name gets these weights (vLLM's load_inplace)


class Limits(_Body):
    max_concurrent_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class TenantBody(_Body):
    name: str
    models: list[str]
    limits: Limits | None = None
    share_prefix_cache: bool = False  # reuse cached prompt KV across tenants


class TenantUpdate(_Body):
    models: list[str] | None = None
    limits: Limits | None = None  # replaces the tenant's limits (a missing field: no limit)
    share_prefix_cache: bool | None = None


class LoadLoraBody(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body (its other fields are ignored, as vLLM does)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # a loaded adapter of that name gets the new weights


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str


class KeyBody(_Body):
    revoke_existing: bool = True


async def _body(state, request: Request, cls, required: bool = True):
    if not required and request.headers.get("content-length") in (None, "0"):
        return cls()
    return validate(cls, await read_json(request, state.config.max_body_bytes))


def router(state) -> APIRouter:
    r = APIRouter(prefix="/admin")
    models = state.models
    store = state.store
    client = state.client

    def admin(fn):
        async def handler(request: Request):
            check_admin(state, request)
            return await fn(request, **request.path_params)
        return handler

    # ---- models -------------------------------------------------------------------------
    async def add_model(request):
        b = await _body(state, request, ModelBody)
        await models.add_model(b.name, b.path, **b.model_dump(exclude={"name", "path"}))
        return JSONResponse({"name": b.name, "path": models.models()[b.name]["path"],
                             "loaded": True}, status_code=201)

    async def list_models(request):
        stats = (await client.stats()).to_dict()
        data = []
        for name, spec in models.models().items():
            live = stats["models"].get(name)
            data.append({"name": name, "path": spec["path"], "loaded": live is not None,
                         "resident": bool(live and live["resident"]),
                         "ttft_ms": spec.get("ttft_ms"), "tbt_ms": spec.get("tbt_ms"),
                         "reasoning_parser": spec.get("reasoning_parser"),
                         "task": spec.get("task") or "generate"})
        return JSONResponse({"object": "list", "data": data})

    def prune_metrics() -> None:
        state.metrics.prune(models.known(), store.tenants())

    async def delete_model(request, name):
        await models.remove_model(name)
        prune_metrics()
        return JSONResponse({"name": name, "deleted": True})

    # ---- adapters -----------------------------------------------------------------------
    async def add_adapter(request):
        b = await _body(state, request, AdapterBody)
        await models.add_adapter(b.name, b.base, b.path, b.replace)
        return JSONResponse({"name": b.name, "base": b.base,
                             "path": models.adapters()[b.name]["path"], "loaded": True},
                            status_code=201)

    async def list_adapters(request):
        data = [{"name": n, "base": a["base"], "path": a["path"],
                 "loaded": models.served(n)} for n, a in models.adapters().items()]
        return JSONResponse({"object": "list", "data": data})

    async def delete_adapter(request, name):
        await models.remove_adapter(name)
        prune_metrics()
        return JSONResponse({"name": name, "deleted": True})

    # ---- tenants ------------------------------------------------------------------------
    def check_models(names: list[str]) -> list[str]:
        known = models.known()
        unknown = [n for n in names if n != "*" and n not in known]
        if unknown:
            raise APIError(400, f"unknown models or adapters: {', '.join(unknown)}",
                           param="models")
        return list(dict.fromkeys(names))

    def tenant_view(name: str, spec: dict) -> dict:
        return {"name": name, "models": spec["models"], "created": spec["created"],
                "num_keys": store.num_keys(name),
                "limits": limits_view(spec.get("limits")),
                "share_prefix_cache": bool(spec.get("share_prefix_cache")),
                "usage": state.limiter.usage(name)}

    def limits_of(body) -> dict | None:
        return None if body.limits is None else body.limits.model_dump()

    async def add_tenant(request):
        b = await _body(state, request, TenantBody)
        check_name(b.name, slash=False)
        names = check_models(b.models)
        if store.tenant(b.name) is not None:
            raise APIError(409, f"tenant {b.name!r} already exists", param="name",
                           code="tenant_exists")
        key = new_key()
        store.put_tenant(b.name, names, [hash_key(key)], limits=limits_of(b) or {},
                         share_prefix_cache=b.share_prefix_cache)
        return JSONResponse({**tenant_view(b.name, store.tenant(b.name)), "api_key": key},
                            status_code=201)

    def tenant_or_404(name):
        spec = store.tenant(name)
        if spec is None:
            raise APIError(404, f"tenant {name!r} does not exist", code="not_found")
        return spec

    async def list_tenants(request):
        return JSONResponse({"object": "list",
                             "data": [tenant_view(n, t) for n, t in store.tenants().items()]})

    async def get_tenant(request, name):
        return JSONResponse(tenant_view(name, tenant_or_404(name)))

    async def update_tenant(request, name):
        spec = tenant_or_404(name)
        b = await _body(state, request, TenantUpdate)
        models = spec["models"] if b.models is None else check_models(b.models)
        store.put_tenant(name, models, limits=limits_of(b),
                         share_prefix_cache=b.share_prefix_cache)
        return JSONResponse(tenant_view(name, store.tenant(name)))

    async def delete_tenant(request, name):
        tenant_or_404(name)
        store.delete_tenant(name)
        state.limiter.forget(name)
        prune_metrics()
        return JSONResponse({"name": name, "deleted": True})

    async def new_tenant_key(request, name):
        spec = tenant_or_404(name)
        b = await _body(state, request, KeyBody, required=False)
        key = new_key()
        store.put_tenant(name, spec["models"], [hash_key(key)], replace_keys=b.revoke_existing)
        return JSONResponse({**tenant_view(name, store.tenant(name)), "api_key": key},
                            status_code=201)

    # ---- the pool -----------------------------------------------------------------------
    async def pool(request):
        return JSONResponse((await client.stats()).to_dict())

    created = {"status": 201}
    routes = [  # path, method, handler, OpenAPI operation id, answer, more of its declaration
        ("/models", "POST", add_model, "addModel", doc.ModelAdded,
         {"body": ModelBody, **created}),
        ("/models", "GET", list_models, "listAdminModels", doc.ModelInfoList, {}),
        ("/models/{name:path}", "DELETE", delete_model, "deleteModel", doc.Deleted, {}),
        ("/adapters", "POST", add_adapter, "addAdapter", doc.AdapterInfo,
         {"body": AdapterBody, **created}),
        ("/adapters", "GET", list_adapters, "listAdapters", doc.AdapterInfoList, {}),
        ("/adapters/{name:path}", "DELETE", delete_adapter, "deleteAdapter", doc.Deleted, {}),
        ("/tenants", "POST", add_tenant, "addTenant", doc.TenantWithKey,
         {"body": TenantBody, **created}),
        ("/tenants", "GET", list_tenants, "listTenants", doc.TenantInfoList, {}),
        ("/tenants/{name}/keys", "POST", new_tenant_key, "newTenantKey", doc.TenantWithKey,
         {"body": KeyBody, "body_required": False, **created}),
        ("/tenants/{name}", "GET", get_tenant, "getTenant", doc.TenantInfo, {}),
        ("/tenants/{name}", "PATCH", update_tenant, "updateTenant", doc.TenantInfo,
         {"body": TenantUpdate}),
        ("/tenants/{name}", "DELETE", delete_tenant, "deleteTenant", doc.Deleted, {}),
        ("/pool", "GET", pool, "getPool", doc.PoolStats, {}),
    ]
    for path, method, fn, operation, answer, more in routes:
        r.add_api_route(path, admin(fn), methods=[method],
                        **doc.admin_route(path, method, operation, answer, **more))
    return r


def vllm_router(state) -> APIRouter:
    """vLLM's adapter operations (admin key): ``POST /v1/load_lora_adapter`` with no base
    model (the adapter's ``base_model_name_or_path`` when it names a registered model, else
    the only model) and ``POST /v1/unload_lora_adapter``; the model roots confine the path,
    and in a cluster the adapter is registered for every worker, as /admin/adapters does."""
    r = APIRouter(prefix="/v1")
    models = state.models

    async def load(request: Request):
        check_admin(state, request)
        b = await _body(state, request, LoadLoraBody)
        current = models.adapters().get(b.lora_name) if b.load_inplace else None
        base = current["base"] if current else models.base_for(b.lora_path)
        await models.add_adapter(b.lora_name, base, b.lora_path, replace=b.load_inplace)
        return JSONResponse({"name": b.lora_name, "base": base,
                             "path": models.adapters()[b.lora_name]["path"], "loaded": True})

    async def unload(request: Request):
        check_admin(state, request)
        b = await _body(state, request, UnloadLoraBody)
        await models.remove_adapter(b.lora_name)
        state.metrics.prune(models.known(), state.store.tenants())
        return JSONResponse({"name": b.lora_name, "deleted": True})

    for path, fn, operation, answer, body in (
            ("/load_lora_adapter", load, "loadLoraAdapter", doc.AdapterInfo, LoadLoraBody),
            ("/unload_lora_adapter", unload, "unloadLoraAdapter", doc.Deleted,
             UnloadLoraBody)):
        r.add_api_route(path, fn, methods=["POST"],
                        **doc.admin_route(path, "POST", operation, answer, body=body,
                                          summary=f"POST /v1{path} (vLLM's)"))
    return r
