"""OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, and the same
under ``/tenants/{tenant}/v1/``."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gpupool.api import openapi
from gpupool.api.auth import Tenant, authenticate, check_model_access
from gpupool.api.errors import APIError, model_not_found
from gpupool.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse,
    sampling_params,
)
from gpupool.api.util import read_json
from gpupool.messages.params import SamplingParams
from gpupool.scheduler.request import RequestError, RequestOutput

logger = logging.getLogger(__name__)


# ---- running a request's choices ------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    request_id: str | None = None
    last: RequestOutput | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass
class Run:
    """The engine requests behind one API call (prompts x n), and their merged outputs."""

    state: object
    model: str
    tenant: Tenant | None
    choices: list[_Choice] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    n: int = 1  # choices per prompt
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    counted: bool = False  # admitted by the tenant's limiter: tell it when the call ends

    async def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Admit the call under the tenant's limits (429), then queue every choice at once,
        or none (400 naming what is wrong)."""
        loop = asyncio.get_running_loop()

        def sink_for(i):
            return lambda out: loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))

        engine = self.state.engine
        await self._admit(sum(len(p) for p in prompts[:: self.n]))
        self.choices = [_Choice(i) for i in range(len(prompts))]
        try:
            rids = await asyncio.to_thread(engine.submit, prompts, params, self.model,
                                           [sink_for(i) for i in range(len(prompts))],
                                           self.tenant.name if self.tenant else None)
        except (RequestError, ValueError) as e:
            self.choices = []
            self._release(0)
            if not engine.has_model(self.model):
                raise model_not_found(self.model) from e
            raise APIError(400, str(e), param="prompt" if isinstance(e, RequestError)
                           else None) from e
        for ch, rid in zip(self.choices, rids):
            ch.request_id = rid

    async def _admit(self, prompt_tokens: int) -> None:
        if self.tenant is None:  # an open server has no tenants and no limits
            return
        limiter = self.state.limiter
        refusal = await asyncio.to_thread(limiter.admit, self.tenant.name, self.call_id,
                                          self.tenant.limits, prompt_tokens)
        if refusal is not None:
            raise APIError(429, f"tenant limit {refusal.limit} reached; retry later",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(refusal.retry_after_s)})
        self.counted = True

    def _release(self, completion_tokens: int) -> None:
        if self.counted:
            self.counted = False
            self.state.limiter.finished(self.tenant.name, self.call_id, completion_tokens)

    def _observe(self, ch: _Choice, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        n = len(out.delta_token_ids)
        if n:
            if self.counted and all(c.first_token_at is None for c in self.choices):
                self.state.limiter.started(self.tenant.name, self.call_id)
            if ch.first_token_at is None:
                ch.first_token_at = now
                metrics.ttft.labels(self.model).observe(now - self.started)
                n -= 1
            elif ch.last_token_at is not None:
                for _ in range(n):
                    metrics.tbt.labels(self.model).observe((now - ch.last_token_at) / n)
            ch.last_token_at = now

    async def events(self):
        """(choice index, output) as they come, until every choice has finished."""
        remaining = sum(1 for c in self.choices if c.last is None or not c.last.finished)
        try:
            while remaining:
                i, out = await self.queue.get()
                ch = self.choices[i]
                self._observe(ch, out)
                ch.last = out
                if out.finished:
                    remaining -= 1
                yield ch, out
        finally:
            if remaining:
                self.abort()
            self._count()

    def abort(self) -> None:
        """Abort unfinished choices (client gone, or a sibling failed to queue)."""
        for ch in self.choices:
            if ch.request_id is not None and (ch.last is None or not ch.last.finished):
                self.state.engine.abort(ch.request_id)

    def _count(self) -> None:
        if self.done:
            return
        self.done = True
        self._release(self.completion_tokens)
        m = self.state.metrics
        status = "ok"
        for ch in self.choices:
            if ch.last is None or not ch.last.finished:
                status = "aborted"
            elif ch.last.error:
                status = "error"
        tenant = self.tenant.name if self.tenant else ""
        m.requests.labels(self.model, tenant, status).inc()
        m.prompt_tokens.labels(self.model, tenant).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.model, tenant).inc(self.completion_tokens)
        if not self.state.engine.has_model(self.model):  # deleted while this call ran
            m.prune(self.state.models.known(), self.state.store.tenants())

    @property
    def prompt_tokens(self) -> int:
        # one prompt may be shared by n choices; usage counts each prompt once, as OpenAI does
        return sum(len(c.last.prompt_token_ids) for c in self.choices[:: self.n]
                   if c.last is not None)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.last.token_ids) for c in self.choices if c.last is not None)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(run: Run, request: Request) -> list[RequestOutput] | None:
    """Every choice's final output, in order; None (run aborted) if the client goes away."""

    async def drain():
        async for _ in run.events():
            pass

    task = asyncio.create_task(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                return [ch.last for ch in run.choices]
            if await request.is_disconnected():
                logger.info("client went away: aborting its request for %s", run.model)
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


def _finish_reason(out: RequestOutput) -> str | None:
    if out.error:
        raise APIError(500, f"generation failed: {out.error}", code="generation_failed")
    return out.finish_reason


# ---- shared request handling ----------------------------------------------------------------
def _tokenizer(state, model: str):
    try:
        return state.engine.tokenizer(model)
    except (RequestError, KeyError):
        raise model_not_found(model) from None


def _lp(value: float) -> float:
    """JSON has no infinities: a -inf log-probability is reported as -9999.0 (as vLLM does)."""
    return value if math.isfinite(value) else -9999.0


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid]) if tokenizer is not None else str(tid)


async def _prepare(state, request: Request, tenant_path: str | None, cls, route: str):
    tenant = await authenticate(state, request, tenant_path)
    body = await read_json(request, state.config.max_body_bytes)
    req = parse(cls, body, route)
    check_model_access(state, tenant, req.model)
    await state.models.ensure(req.model)
    incoming = req.n * (len(req.prompts()) if isinstance(req, CompletionRequest) else 1)
    if incoming > state.config.max_queued_requests:  # could never be admitted: not a 503
        raise APIError(400, f"the request makes {incoming} choices (n x prompts); the server "
                            f"queues at most {state.config.max_queued_requests}", param="n")
    if state.engine.num_unfinished() + incoming > state.config.max_queued_requests:
        raise APIError(503, "the server's request queue is full; retry later",
                       code="queue_full", headers={"Retry-After": "1"})
    return tenant, req


def _params_for(state, req, prompt_len: int, max_tokens, logprobs, default_max):
    """One SamplingParams per choice. A missing ``max_tokens`` becomes ``default_max`` (or
    all the room left), capped by the context; an explicit one beyond it is a 400."""
    try:
        limit = state.engine.context_limit(req.model)
    except (RequestError, KeyError):
        raise model_not_found(req.model) from None
    room = limit - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context "
                            f"holds {limit} tokens (prompt + at least one new token)",
                       param="messages" if hasattr(req, "messages") else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if default_max is None else min(default_max, room)
    elif isinstance(max_tokens, int) and max_tokens > room:
        raise APIError(400, f"this model's context holds {limit} tokens, but the request "
                            f"asks for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                            f"{max_tokens} to generate); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    out = []
    for k in range(req.n):
        seed = None if req.seed is None else req.seed + k
        out.append(sampling_params(req, max_tokens, logprobs, seed))
    return out


async def _start(state, req, tenant, prompts: list, params: list[SamplingParams]):
    """The Run with every choice queued, and the model's tokenizer (for logprob tokens)."""
    tokenizer = _tokenizer(state, req.model)
    run = Run(state, req.model, tenant, n=req.n)
    await run.start(prompts, params)
    return run, tokenizer


def _new_logprobs(out: RequestOutput):
    """The logprobs of the tokens this update added (one entry per output token)."""
    if out.logprobs is None:
        return None
    return out.logprobs[len(out.token_ids) - len(out.delta_token_ids):]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_error(e: APIError) -> str:
    return _sse(e.body())


# ---- completions ----------------------------------------------------------------------------
def _completion_logprobs(tokenizer, lps, text_start: int = 0):
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_start
    for tid, lp, top in lps:
        t = _token_text(tokenizer, tid)
        tokens.append(t)
        token_lps.append(_lp(lp))
        tops.append({_token_text(tokenizer, i): _lp(v) for i, v in top})
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _tokenize_all(state, model: str, prompts: list) -> list[list[int]]:
    """Every prompt as checked token ids, once (the engine takes ids as they are)."""
    out = []
    for i, prompt in enumerate(prompts):
        try:
            out.append(state.engine.tokenize(model, prompt))
        except (RequestError, KeyError) as e:
            if not state.engine.has_model(model):  # removed since the request came in
                raise model_not_found(model) from None
            raise APIError(400, f"prompt {i}: {e}" if len(prompts) > 1 else str(e),
                           param="prompt") from None
    return out


async def completions(state, request: Request, tenant_path: str | None = None):
    tenant, req = await _prepare(state, request, tenant_path, CompletionRequest,
                                 "/v1/completions")
    prompts = await asyncio.to_thread(_tokenize_all, state, req.model, req.prompts())
    per_choice_prompts, params = [], []
    for prompt in prompts:
        ps = _params_for(state, req, len(prompt), req.max_tokens, req.logprobs, 16)
        per_choice_prompts += [prompt] * req.n
        params += ps
    run, tokenizer = await _start(state, req, tenant, per_choice_prompts, params)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def body(choices, usage=None):
        b = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
             "choices": choices}
        if usage is not None or not req.stream:
            b["usage"] = usage
        return b

    if not req.stream:
        outs = await _collect(run, request)
        if outs is None:
            return Response(status_code=499)  # nobody is listening any more
        choices = [{"index": i, "text": out.text,
                    "logprobs": _completion_logprobs(tokenizer, out.logprobs),
                    "finish_reason": _finish_reason(out)} for i, out in enumerate(outs)]
        return JSONResponse(body(choices, run.usage()))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def stream():
        offset: dict[int, int] = {}  # characters of token text already sent, per choice
        try:
            async for ch, out in run.events():
                lps = _completion_logprobs(tokenizer, _new_logprobs(out),
                                           offset.get(ch.index, 0))
                if lps and lps["tokens"]:
                    offset[ch.index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
                if not out.delta_text and not out.finished and not lps:
                    continue
                reason = _finish_reason(out) if out.finished else None
                chunk = body([{"index": ch.index, "text": out.delta_text, "logprobs": lps,
                               "finish_reason": reason}])
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            if include_usage:
                yield _sse(body([], run.usage()))
        except APIError as e:
            yield _stream_error(e)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


# ---- chat completions -----------------------------------------------------------------------
def _chat_logprobs(tokenizer, lps):
    if lps is None:
        return None
    content = []
    for tid, lp, top in lps:
        t = _token_text(tokenizer, tid)
        content.append({"token": t, "logprob": _lp(lp), "bytes": list(t.encode()),
                        "top_logprobs": [{"token": (s := _token_text(tokenizer, i)),
                                          "logprob": _lp(v), "bytes": list(s.encode())}
                                         for i, v in top]})
    return {"content": content}


def _chat_prompt(state, req: ChatCompletionRequest) -> list[int]:
    tok = state.engine.tokenizer(req.model)
    if tok is None or not getattr(tok, "chat_template", None):
        raise APIError(400, f"model {req.model!r} has no chat template; use /v1/completions",
                       param="model")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may raise on an order of roles it does not allow
        raise APIError(400, f"the chat template refused the messages: {e}",
                       param="messages") from e
    try:
        return list(tok(text, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, UnicodeError) as e:
        raise APIError(400, f"the messages cannot be tokenized: {e}", param="messages") from e


async def chat_completions(state, request: Request, tenant_path: str | None = None):
    tenant, req = await _prepare(state, request, tenant_path, ChatCompletionRequest,
                                 "/v1/chat/completions")
    prompt = await asyncio.to_thread(_chat_prompt, state, req)
    max_tokens = req.max_tokens if req.max_completion_tokens is None else (
        req.max_completion_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params_for(state, req, len(prompt), max_tokens, logprobs, None)
    run, tokenizer = await _start(state, req, tenant, [prompt] * req.n, params)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not req.stream:
        outs = await _collect(run, request)
        if outs is None:
            return Response(status_code=499)  # nobody is listening any more
        choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                    "logprobs": _chat_logprobs(tokenizer, out.logprobs),
                    "finish_reason": _finish_reason(out)} for i, out in enumerate(outs)]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                             "model": req.model, "choices": choices, "usage": run.usage()})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices, usage=False, usage_value=None):
        c = {"id": cid, "object": "chat.completion.chunk", "created": created,
             "model": req.model, "choices": choices}
        if usage:
            c["usage"] = usage_value
        return c

    async def stream():
        try:
            for ch in run.choices:
                yield _sse(chunk([{"index": ch.index,
                                   "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], include_usage))
            async for ch, out in run.events():
                lps = _chat_logprobs(tokenizer, _new_logprobs(out))
                if out.delta_text or lps:
                    yield _sse(chunk([{"index": ch.index, "delta": {"content": out.delta_text},
                                       "logprobs": lps, "finish_reason": None}], include_usage))
                if out.finished:
                    yield _sse(chunk([{"index": ch.index, "delta": {}, "logprobs": None,
                                       "finish_reason": _finish_reason(out)}], include_usage))
            if include_usage:
                yield _sse(chunk([], True, run.usage()))
        except APIError as e:
            yield _stream_error(e)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


# ---- models ---------------------------------------------------------------------------------
def _model_card(state, name: str, base: str | None) -> dict:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "gpupool",
            "root": name if base is None else base, "parent": base}


async def list_models(state, request: Request, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    known = state.models.known()
    data = [_model_card(state, n, b) for n, b in known.items()
            if tenant is None or tenant.may_use(n)]
    return JSONResponse({"object": "list", "data": data})


async def get_model(state, request: Request, model: str, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    base = check_model_access(state, tenant, model)
    return JSONResponse(_model_card(state, model, base))


def router(state) -> APIRouter:
    r = APIRouter()
    for prefix in ("/v1", "/tenants/{tenant}/v1"):
        def bind(fn):
            async def handler(request: Request):
                return await fn(state, request, request.path_params.get("tenant"))
            return handler

        async def one_model(request: Request):
            return await get_model(state, request, request.path_params["model"],
                                   request.path_params.get("tenant"))

        for path, fn, kind, method in (
                ("/models", bind(list_models), "models", "GET"),
                ("/models/{model:path}", one_model, "model", "GET"),
                ("/completions", bind(completions), "completions", "POST"),
                ("/chat/completions", bind(chat_completions), "chat", "POST")):
            r.add_api_route(prefix + path, fn, methods=[method],
                            **openapi.openai_route(kind, prefix + path))
    return r


__all__ = ["router", "Tenant"]
