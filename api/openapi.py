"""The OpenAPI document of the routes (``GET /openapi.json``): request bodies, response bodies
and error bodies, for clients and for schema-driven fuzzing (tests/test_fuzz.py).

Documentation only: the routes keep reading the raw request and validating it themselves
(``api.protocol.parse``, ``api.protocol.validate``), so a body of the wrong shape stays a 400
in OpenAI's error format. The request schemas are the very pydantic models the routes
validate with; the response schemas below mirror what the handlers build by hand.

A streamed answer (``stream: true``) is ``text/event-stream``: its ``schema`` describes one
event (the convention of OpenAPI before 3.2, which has no ``itemSchema``), whose ``data`` is
a JSON chunk, an error body, or ``[DONE]``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from gpupool.api.protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 429, 503)
DESCRIPTION = ("OpenAI-compatible API under /v1 (and /tenants/{tenant}/v1, one tenant's path), "
               "admin API under /admin. Errors are OpenAI's error body.")
TENANT_KEY = "tenantKey"
ADMIN_KEY = "adminKey"
METRICS_KEY = "metricsKey"


class _Out(BaseModel):
    """A response body: every field is always sent (nullable ones as null), nothing else."""

    model_config = ConfigDict(extra="forbid")


# ---- errors -----------------------------------------------------------------------------------
class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Out):
    """OpenAI's error format (``api.errors.APIError``)."""

    error: ErrorDetail


# ---- OpenAI responses -------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class PromptTokensDetails(_Out):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token of an echo
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(_Out):
    logprob: float
    rank: int | None  # among the model's tokens (1: the most likely)
    decoded_token: str


# vLLM's prompt_logprobs: None for the first prompt token, then {token id: PromptLogprob}
# for the token and the top alternatives; null unless the request asked for them
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Out):
    """One streamed event of ``/v1/completions``; ``usage`` is sent (null until the last
    chunk) only with ``stream_options.include_usage``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class ToolFunction(_Out):
    name: str
    arguments: str  # JSON text of an object


class ToolCallOut(_Out):
    id: str
    type: Literal["function"]
    function: ToolFunction


class ToolCallDelta(ToolCallOut):
    index: int


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None  # None when the answer is only tool calls (or only reasoning)
    tool_calls: list[ToolCallOut]  # [] without calls (as vLLM sends it)
    reasoning_content: str | None = None  # a thinking model's (its reasoning parser)


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None  # the prompt's, once (where vLLM puts it)


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None  # all of an answer's calls, at its end
    reasoning_content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Out):
    status: str


# ---- admin responses --------------------------------------------------------------------------
class ModelAdded(_Out):
    name: str
    path: str
    loaded: bool


class ModelInfo(_Out):
    name: str
    path: str
    loaded: bool
    resident: bool
    ttft_ms: float | None
    tbt_ms: float | None
    reasoning_parser: str | None
    task: str


class ModelInfoList(_Out):
    object: Literal["list"]
    data: list[ModelInfo]


class AdapterInfo(_Out):
    name: str
    base: str
    path: str
    loaded: bool


class AdapterInfoList(_Out):
    object: Literal["list"]
    data: list[AdapterInfo]


class Deleted(_Out):
    name: str
    deleted: bool


class TenantLimits(_Out):
    max_concurrent_requests: int | None
    max_queued_requests: int | None
    tokens_per_minute: int | None


class TenantUsage(_Out):
    requests_in_flight: int
    requests_queued: int
    tokens_this_minute: int


class TenantInfo(_Out):
    name: str
    models: list[str]
    created: int
    num_keys: int
    limits: TenantLimits
    share_prefix_cache: bool
    usage: TenantUsage


class TenantWithKey(TenantInfo):
    """A tenant as created, or with a new key: the key is shown this once."""

    api_key: str


class TenantInfoList(_Out):
    object: Literal["list"]
    data: list[TenantInfo]


class PoolStats(BaseModel):
    """``Engine.stats()``: the arena, resident models and adapters, KV pages, swaps."""

    model_config = ConfigDict(extra="allow")
    device: str
    policy: str
    arena: dict[str, Any]
    kv_pages: dict[str, int]
    swaps: dict[str, int | float]
    resident_models: list[str]
    models: dict[str, dict[str, Any]]
    adapters: dict[str, str]
    requests: int
    recent_swaps: list[dict[str, Any]] = Field(
        default_factory=list, description="The last residency changes, newest last: time "
        "(Unix seconds), model, bytes, seconds waited, evicted models, prefetched")


# ---- route declarations -----------------------------------------------------------------------
# models the declarations reference that FastAPI does not see (request bodies, stream chunks),
# by component name; build() adds their schemas
_COMPONENTS: dict[str, type[BaseModel]] = {}


def _register(cls: type[BaseModel]) -> str:
    """``cls``'s component reference, registered for build()."""
    known = _COMPONENTS.setdefault(cls.__name__, cls)
    if known is not cls:
        raise ValueError(f"two models are named {cls.__name__}")
    return REF + cls.__name__


def _request_body(cls: type[BaseModel], required: bool = True) -> dict:
    return {"required": required,
            "content": {JSON: {"schema": {"$ref": _register(cls)}}}}


def _errors() -> dict:
    return {status: {"model": ErrorBody} for status in ERROR_STATUSES}


def _path_params(path: str) -> list[dict]:
    names = [part[1:-1].split(":")[0] for part in path.split("/")
             if part.startswith("{") and part.endswith("}")]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in names]


def _stream_event(*chunks: type[BaseModel]) -> dict:
    """The schema of one event of a streamed answer: a JSON chunk, an error, or [DONE]."""
    payload = {"anyOf": [{"$ref": _register(c)} for c in (*chunks, ErrorBody)]}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": JSON, "contentSchema": payload}]},
                "event": {"type": "string"}, "id": {"type": "string"},
                "retry": {"type": "integer", "minimum": 0}}}


class Tokens(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None  # with return_token_strs (vLLM's)


class Detokenized(_Out):
    prompt: str


class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Out):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ResponseObject(BaseModel):
    """OpenAI's Response (``/v1/responses``; fields as OpenAI documents them)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class ResponseEvent(BaseModel):
    """One event of a streamed response (``type``: ``response.created``, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class ResponseDeleted(_Out):
    id: str
    object: Literal["response"]
    deleted: bool


class Version(_Out):
    version: str


def openai_route(kind: str, path: str) -> dict:
    """Keyword arguments of ``add_api_route`` documenting one OpenAI route; ``kind`` is
    ``models``, ``model``, ``completions``, ``chat``, ``embeddings``, ``tokenize``,
    ``detokenize`` or ``version``."""
    from gpupool.api.protocol import DetokenizeRequest, EmbeddingRequest, TokenizeRequest
    from gpupool.api.responses import ResponsesRequest

    tenant = path.startswith("/tenants/")
    request, answer, chunk, summary, op = {
        "tokenize": (TokenizeRequest, Tokens, None, "Token ids of a prompt (vLLM's)",
                     "tokenize"),
        "detokenize": (DetokenizeRequest, Detokenized, None, "Text of token ids (vLLM's)",
                       "detokenize"),
        "version": (None, Version, None, "The server's version", "version"),
        "models": (None, ModelList, None, "Models this key may use", "listModels"),
        "model": (None, ModelCard, None, "One model this key may use", "retrieveModel"),
        "completions": (CompletionRequest, Completion, CompletionChunk, "Text completion",
                        "createCompletion"),
        "chat": (ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
                 "Chat completion", "createChatCompletion"),
        "embeddings": (EmbeddingRequest, EmbeddingList, None,
                       "Embeddings (models registered with task embed)", "createEmbedding"),
        "responses": (ResponsesRequest, ResponseObject, ResponseEvent, "A response",
                      "createResponse"),
        "response": (None, ResponseObject, None, "A stored response", "getResponse"),
        "response_delete": (None, ResponseDeleted, None, "Delete a stored response",
                            "deleteResponse"),
    }[kind]
    ok: dict[str, Any] = {"model": answer}
    if chunk is not None:
        ok["description"] = f"the answer; with `stream: true`, {EVENT_STREAM}"
        ok["content"] = {EVENT_STREAM: {"schema": _stream_event(chunk)}}
    extra: dict[str, Any] = {
        # open server (no tenants yet): no key; then a tenant's key (under /tenants/{t}: t's)
        "security": [{TENANT_KEY: []}, {}],
    }
    params = _path_params(path)
    if params:
        extra["parameters"] = params
    if request is not None:
        extra["requestBody"] = _request_body(request)
    return {"summary": summary + (" (one tenant's path)" if tenant else ""),
            "operation_id": op + ("ForTenant" if tenant else ""),
            "tags": ["openai"], "responses": {200: ok, **_errors()}, "openapi_extra": extra}


def admin_route(path: str, method: str, operation_id: str, answer: type[BaseModel],
                body: type[BaseModel] | None = None, body_required: bool = True,
                status: int = 200, summary: str | None = None) -> dict:
    """Keyword arguments of ``add_api_route`` documenting one admin route."""
    extra: dict[str, Any] = {"security": [{ADMIN_KEY: []}]}
    params = _path_params(path)
    if params:
        extra["parameters"] = params
    if body is not None:
        extra["requestBody"] = _request_body(body, body_required)
    return {"summary": summary or f"{method} /admin{path.replace(':path', '')}",
            "operation_id": operation_id, "tags": ["admin"], "status_code": status,
            "responses": {status: {"model": answer}, **_errors()}, "openapi_extra": extra}


def health_route() -> dict:
    return {"summary": "Whether the server is up", "tags": ["server"],
            "responses": {200: {"model": Health},
                          503: {"model": Health, "description": "the engine has stopped"}}}


def metrics_route() -> dict:
    """Prometheus text; once tenants exist it needs the metrics or the admin key (unless the
    server was started with --public-metrics)."""
    return {"summary": "Prometheus metrics", "tags": ["server"],
            "response_class": PlainTextResponse,
            "responses": {401: {"model": ErrorBody}},
            "openapi_extra": {"security": [{METRICS_KEY: []}, {ADMIN_KEY: []}, {}]}}


def status_page_route() -> dict:
    """The operators' status page: one HTML file that reads the admin API with the admin key
    typed into it (so the page itself needs no key)."""
    error = {"application/json": {"schema": {"$ref": REF + "ErrorBody"}}}
    return {"summary": "The operators' status page (HTML)", "tags": ["admin"],
            "operation_id": "statusPage", "response_class": HTMLResponse,
            "responses": {403: {"description": "The admin API is disabled", "content": error}}}


def root_route() -> dict:
    return {"summary": "Says what this server is", "tags": ["server"],
            "response_class": PlainTextResponse}


def _extra_components() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, cls in _COMPONENTS.items():
        mode = "serialization" if issubclass(cls, _Out) else "validation"
        schema = cls.model_json_schema(ref_template=REF + "{model}", mode=mode)
        for sub, sub_schema in [*schema.pop("$defs", {}).items(), (name, schema)]:
            if out.setdefault(sub, sub_schema) != sub_schema:
                raise ValueError(f"two OpenAPI schemas are named {sub}")
    return out


def build(app: FastAPI) -> dict:
    """The app's OpenAPI document: FastAPI's, plus the schemas it does not see (request
    bodies, stream chunks) and the bearer key schemes."""
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      description=DESCRIPTION, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, schema in _extra_components().items():
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two OpenAPI schemas are named {name}")
        schemas[name] = schema
    components["securitySchemes"] = {
        TENANT_KEY: {"type": "http", "scheme": "bearer",
                     "description": "a tenant's API key (needed once any tenant exists)"},
        ADMIN_KEY: {"type": "http", "scheme": "bearer",
                    "description": "the server's admin key (--admin-key)"},
        METRICS_KEY: {"type": "http", "scheme": "bearer",
                      "description": "the server's metrics key (--metrics-key)"},
    }
    return doc


def install(app: FastAPI) -> None:
    """Serve ``build(app)`` as the app's OpenAPI document (made once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi
