"""The HTTP server: FastAPI app wiring, error handlers, health and metrics, ``serve()``."""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gpupool.api import openapi, routes_admin, routes_openai
from gpupool.api.auth import check_admin_enabled, check_metrics_access
from gpupool.api.errors import APIError
from gpupool.api.limits import TenantLimiter
from gpupool.api.metrics import Metrics
from gpupool.api.models import ModelManager
from gpupool.api.state import StateStore, hash_key
from gpupool.config import ServerConfig
from gpupool.messages.client import EngineClient

STATUS_PAGE = importlib.resources.files("gpupool.api").joinpath("status.html").read_text()
logger = logging.getLogger("gpupool.api")


@dataclass
class AppState:
    config: ServerConfig
    client: EngineClient
    store: StateStore
    models: ModelManager
    metrics: Metrics
    started: int
    limiter: TenantLimiter


def build_state(config: ServerConfig, client: EngineClient) -> AppState:
    """State store and model registry over an engine ``client``; config models and adapters
    are loaded now (so a bad one stops the server before it listens). The state owns the
    client from here: it is closed with the state (or at once if this fails)."""
    try:
        store = StateStore.open(config.redis_url, client.home, config.require_auth)
        store.auth_required()  # the marker written now if the store says so
        for t in config.tenants:  # seeded once; later admin changes (rotation) persist
            if store.tenant(t.name) is not None:
                logger.info("tenant %s is already in the state store; its config entry is "
                            "not applied again (change it through the admin API)", t.name)
                continue
            hashes = [hash_key(k) for k in t.api_keys] + list(t.key_hashes)
            store.put_tenant(t.name, list(t.models), hashes, limits=t.limits,
                             share_prefix_cache=t.share_prefix_cache)
        models = ModelManager(client, store, config)
        asyncio.run(models.load_static())
    except BaseException:
        client.close()
        raise
    return AppState(config, client, store, models, Metrics(), int(time.time()),
                    TenantLimiter(store.r, config.limit_lease_s))


def create_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.limiter.close()
        state.client.close()
        state.store.close()

    app = FastAPI(title="gpupool", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gpupool = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return APIError(400, str(e)).response()

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, e: redis.RedisError):
        logger.warning("Redis unavailable on %s: %s", request.url.path, e)
        return APIError(503, "the server's state store (Redis) is unavailable; retry later",
                        code="state_unavailable", headers={"Retry-After": "1"}).response()

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, e: ClientDisconnect):
        # the client went away mid-upload: nobody reads an answer; one quiet line
        logger.info("client left during the upload of %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    @app.get("/health", **openapi.health_route())
    async def health():  # says only whether it is up: no names of anyone's models
        if not state.client.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", **openapi.metrics_route())
    async def metrics(request: Request):
        await asyncio.to_thread(check_metrics_access, state, request)
        state.metrics.pool_stats = (await state.client.stats()).to_dict()
        body = await asyncio.to_thread(generate_latest, state.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/", **openapi.status_page_route())
    async def status_page():  # the page asks for the admin key itself; it holds no data
        check_admin_enabled(state)
        return HTMLResponse(STATUS_PAGE)

    @app.get("/", **openapi.root_route())
    async def root():
        return PlainTextResponse("gpupool: OpenAI-compatible API under /v1\n")

    app.include_router(routes_openai.router(state))
    app.include_router(routes_admin.router(state))
    app.include_router(routes_admin.vllm_router(state))
    openapi.install(app)  # request, response and error bodies, and the two key schemes
    return app


def startup_lines(state: AppState, seconds: float) -> list[tuple[int, str]]:
    """What ``serve()`` says once it listens: (log level, line) pairs."""
    config = state.config
    host = f"[{config.host}]" if ":" in config.host else config.host
    known = state.models.known()
    adapters = [f"{n} (on {b})" for n, b in known.items() if b is not None]
    lines = [
        (logging.INFO, f"ready in {seconds:.1f} s, listening on http://{host}:{config.port}/v1"
                       " (OpenAI API)"),
        (logging.INFO, "models: " + (", ".join(n for n, b in known.items() if b is None)
                                     or "none")),
        (logging.INFO, "adapters: " + (", ".join(adapters) or "none")),
    ]
    if state.store.auth_required():
        lines.append((logging.INFO, f"tenants: {len(state.store.tenants())} (bearer keys "
                                    "required)"))
    else:
        lines.append((logging.WARNING, "the server is OPEN: no tenants yet, so anyone who can "
                                       f"reach {host}:{config.port} may use every model"))
    lines.append((logging.INFO, "admin API: " + ("on /admin (admin key)" if config.admin_key
                                                 else "disabled (no --admin-key)")))
    return lines


def serve(config: ServerConfig, client: EngineClient, started_at: float | None = None) -> None:
    """Load, bind, say so, serve until a signal; ``client``: the engine's (the server closes
    it); ``started_at`` (``time.time()``, default the process's start) is what "ready in"
    counts from."""
    import psutil
    import uvicorn

    started_at = psutil.Process().create_time() if started_at is None else started_at
    state = build_state(config, client)
    try:
        server = uvicorn.Server(uvicorn.Config(
            create_app(state), host=config.host, port=config.port, log_level=config.log_level,
            timeout_graceful_shutdown=5))
        sock = server.config.bind_socket()  # a taken port fails here, before "ready"
        for level, line in startup_lines(state, time.time() - started_at):
            logger.log(level, line)
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down
        pass
    finally:
        state.limiter.close()
        state.client.close()
        state.store.close()
