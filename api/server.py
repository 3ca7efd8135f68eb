"""The HTTP server: FastAPI app wiring, error handlers, health and metrics, ``serve()``."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpupool.api import routes_admin, routes_openai
from gpupool.api.errors import APIError
from gpupool.api.metrics import Metrics
from gpupool.api.models import ModelManager
from gpupool.api.state import StateStore, hash_key
from gpupool.config import Config, ServerConfig
from gpupool.engine import Engine

logger = logging.getLogger("gpupool.api")


@dataclass
class AppState:
    config: ServerConfig
    engine: Engine
    store: StateStore
    models: ModelManager
    metrics: Metrics
    started: int


def build_state(config: ServerConfig) -> AppState:
    """Engine, state store and model registry; config models and adapters are loaded now
    (so a bad one stops the server before it listens)."""
    engine = Engine(config=Config.from_env(**config.engine))
    try:
        store = StateStore.open(config.redis_url, engine.config.home)
        for t in config.tenants:  # seeded once; later admin changes (rotation) persist
            if store.tenant(t.name) is not None:
                logger.info("tenant %s is already in the state store; its config entry is "
                            "not applied again (change it through the admin API)", t.name)
                continue
            hashes = [hash_key(k) for k in t.api_keys] + list(t.key_hashes)
            store.put_tenant(t.name, list(t.models), hashes)
        models = ModelManager(engine, store, config)
        models.load_static()
    except BaseException:
        engine.shutdown()
        raise
    return AppState(config, engine, store, models, Metrics(engine), int(time.time()))


def create_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        state.engine.shutdown()
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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}",
                                       "type": "server_error", "param": None, "code": None}},
                            status_code=500)

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "models": state.engine.models}

    @app.get("/metrics")
    async def metrics():  # reads engine stats under its lock: off the event loop
        body = await asyncio.to_thread(generate_latest, state.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def root():
        return PlainTextResponse("gpupool: OpenAI-compatible API under /v1\n")

    app.include_router(routes_openai.router(state))
    app.include_router(routes_admin.router(state))
    return app


def serve(config: ServerConfig) -> None:
    import uvicorn

    state = build_state(config)
    if not state.store.auth_required():
        logger.warning("no tenants are configured: the server is OPEN, anyone who can reach "
                       "http://%s:%d may use every model", config.host, config.port)
    if not config.admin_key:
        logger.warning("no admin key: the admin API is disabled")
    logger.info("serving %s on http://%s:%d/v1", ", ".join(state.models.known()),
                config.host, config.port)
    uvicorn.run(create_app(state), host=config.host, port=config.port,
                log_level=config.log_level, timeout_graceful_shutdown=5)
