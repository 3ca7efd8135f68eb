"""OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, and the same
under ``/tenants/{tenant}/v1/``.

Both completion routes run one path (``_complete``); a :class:`_Route` says what differs
(how the prompts are made, the default max_tokens, how a choice and a chunk look). The
engine is reached only through its client (``state.client``); text goes through
:mod:`gpupool.frontend.text`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gpupool.api import openapi
from gpupool.api.auth import Tenant, authenticate, check_model_access
from gpupool.api.errors import APIError, model_not_found
from gpupool.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
    sampling_params,
    template_options,
    validate,
)
from gpupool.api.util import read_json
from gpupool.frontend.reasoning import (
    AnswerStream,
    is_harmony,
    prompt_state,
    read_answer,
    reasoning_markers,
)
from gpupool.frontend.text import (
    ContextLengthError,
    RequestOutput,
    TextStream,
    chat_prompt,
    max_tokens_for,
    tokenize,
    tool_format,
)
from gpupool.messages.errors import EngineError, RequestError
from gpupool.messages.types import EngineRequest, ModelInfo, OutputDelta

logger = logging.getLogger(__name__)


# ---- running a call's choices ---------------------------------------------------------------
@dataclass
class _Choice:
    index: int
    request: EngineRequest
    text: TextStream
    last: RequestOutput | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0  # output tokens seen
    aborted: bool = False  # an abort was sent to the engine
    finished_at: float | None = None

    @property
    def cached_tokens(self) -> int:
        return self.text.cached_tokens

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished


def _off_loop(fn, *args) -> asyncio.Future:
    """Run a limiter update in a thread (a Redis round trip, which a stalled Redis makes
    seconds long, never on the event loop); its errors are logged by the limiter."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


@dataclass
class Run:
    """The engine requests behind one API call (prompts x n), and their merged outputs."""

    state: object
    model: str
    tenant: Tenant | None
    n: int = 1  # choices per prompt
    choices: list[_Choice] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    done: bool = False
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    counted: bool = False  # admitted by the tenant's limiter: tell it when the call ends
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _pumps: list = field(default_factory=list)
    _release_done: asyncio.Future | None = None  # the limiter's release of this call

    async def start(self, choices: list[_Choice]) -> None:
        """Admit the call under the tenant's limits (429), then queue every choice at once,
        or none (400 naming what is wrong)."""
        client = self.state.client
        await self._admit(sum(len(c.request.prompt_token_ids) for c in choices[:: self.n]))
        try:
            streams = await client.submit([c.request for c in choices])
        except RequestError as e:
            self._release(0)
            if client.model_info(self.model) is None:
                raise model_not_found(self.model) from e
            raise APIError(400, str(e), param=getattr(e, "param", None) or "prompt") from e
        except EngineError as e:  # the engine refused for another reason
            self._release(0)
            raise APIError(503, f"the engine could not take the request: {e}",
                           code="engine_unavailable", headers={"Retry-After": "1"}) from e
        except BaseException:
            self._release(0)
            raise
        self.choices = choices
        for i, s in enumerate(streams):  # one queue for all choices, in arrival order
            self._pumps.append(asyncio.create_task(self._pump(i, s)))

    async def _pump(self, i: int, stream) -> None:
        index = 0
        try:
            async for delta in stream:
                index = delta.index + len(delta.token_ids)
                self._queue.put_nowait((i, delta))
        except Exception as e:  # the stream broke (a remote engine gone): end the choice
            logger.exception("output stream of %s failed", stream.request_id)
            self._queue.put_nowait((i, OutputDelta(stream.request_id, index,
                                                   finish_reason="abort",
                                                   error=f"output stream failed: {e}")))
        finally:
            await stream.aclose()  # cancelled before its end: abort it

    async def _admit(self, prompt_tokens: int) -> None:
        if self.tenant is None:  # an open server has no tenants and no limits
            return
        limiter = self.state.limiter
        tenant, call_id = self.tenant.name, self.call_id
        admitting = asyncio.ensure_future(asyncio.to_thread(
            limiter.admit, tenant, call_id, self.tenant.limits, prompt_tokens))
        try:
            refusal = await asyncio.shield(admitting)
        except asyncio.CancelledError:  # the client left while Redis counted the call: the
            # thread still counts it, and nothing would release it (its lease renewed for
            # ever); release it once the count is made
            def release(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None and done.result() is None:
                    _off_loop(limiter.finished, tenant, call_id, 0)
            admitting.add_done_callback(release)
            raise
        if refusal is not None:
            raise APIError(429, f"tenant limit {refusal.limit} reached; retry later",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(refusal.retry_after_s)})
        self.counted = True

    def _release(self, completion_tokens: int) -> None:
        if self.counted:
            self.counted = False
            self._release_done = _off_loop(self.state.limiter.finished, self.tenant.name,
                                           self.call_id, completion_tokens)

    async def released(self) -> None:
        """Wait until the limiter has released this call (before the answer's last byte:
        a client's next call then finds its slot free). Shielded: a waiter cancelled (a
        streaming client gone) would cancel the release still queued for a thread, and the
        call would hold its slot, its lease renewed, for ever."""
        if self._release_done is not None:
            await asyncio.shield(self._release_done)

    def _observe(self, ch: _Choice, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        n = len(out.delta_token_ids)
        ch.tokens += n
        if n:
            if self.counted and all(c.first_token_at is None for c in self.choices):
                _off_loop(self.state.limiter.started, self.tenant.name, self.call_id)
            if ch.first_token_at is None:
                ch.first_token_at = now
                metrics.ttft.labels(self.model).observe(now - self.started)
                metrics.vllm_ttft.labels(self.model).observe(now - self.started)
                n -= 1
            elif ch.last_token_at is not None:
                for _ in range(n):
                    metrics.tbt.labels(self.model).observe((now - ch.last_token_at) / n)
                    metrics.vllm_itl.labels(self.model).observe((now - ch.last_token_at) / n)
            ch.last_token_at = now

    async def events(self):
        """(choice, output) as they come, until every choice has finished. A stop string
        ends a choice here (the text side) and aborts its engine request."""
        remaining = sum(not c.finished for c in self.choices)
        try:
            while remaining:
                i, delta = await self._queue.get()
                ch = self.choices[i]
                out = ch.text.feed(delta)
                if ch.text.stopped and not ch.aborted:
                    ch.aborted = True
                    await self.state.client.abort(ch.request.request_id)
                if out is None:
                    continue
                self._observe(ch, out)
                ch.last = out
                if out.finished:
                    ch.finished_at = time.monotonic()
                    remaining -= 1
                yield ch, out
        finally:
            if remaining:
                self.abort()
            self._count()

    def abort(self) -> None:
        """Abort unfinished choices (client gone, or the call failed)."""
        for task in self._pumps:
            task.cancel()  # a pump that has started aborts its request as it ends
        for ch in self.choices:
            if not ch.finished and not ch.aborted:
                ch.aborted = True
                asyncio.ensure_future(self.state.client.abort(ch.request.request_id))

    def _count(self) -> None:
        if self.done:
            return
        self.done = True
        self._release(self.completion_tokens)
        m = self.state.metrics
        status = "ok"
        for ch in self.choices:
            if not ch.finished:
                status = "aborted"
            elif ch.last.error:
                status = "error"
        tenant = self.tenant.name if self.tenant else ""
        m.requests.labels(self.model, tenant, status).inc()
        m.prompt_tokens.labels(self.model, tenant).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.model, tenant).inc(self.completion_tokens)
        m.vllm_prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        m.vllm_generation_tokens.labels(self.model).inc(self.completion_tokens)
        finished = [ch for ch in self.choices if ch.finished]  # a client's abort: none
        now = time.monotonic()
        for ch in finished:
            m.observe_choice(self.model, self.started, ch, now)
        if finished:
            m.vllm_max_gen.labels(self.model).observe(
                max(len(ch.text.token_ids) for ch in finished))
            m.vllm_n.labels(self.model).observe(self.n)
        try:  # a clean-up: never let Redis being away break the answer's end
            info = self.state.client.model_info(self.model)
            if info is None:  # deleted while this call ran
                m.prune(self.state.models.known(), self.state.store.tenants())
        except Exception as e:  # noqa: BLE001 (Redis errors, whatever the client raises)
            logger.warning("call %s: SLO metrics not counted: %s", self.call_id, e)
            return
        if info is not None and info.ttft_ms is not None and info.tbt_ms is not None:
            for ch in self.choices:  # vLLM's goodput rule (scheduler.metrics.meets_slo)
                if ch.finished and not ch.last.error and ch.first_token_at is not None:
                    ttft = ch.first_token_at - self.started
                    tpot = ((ch.last_token_at - ch.first_token_at) / (ch.tokens - 1)
                            if ch.tokens > 1 else 0.0)
                    met = ttft <= info.ttft_ms / 1000 and tpot <= info.tbt_ms / 1000
                    m.slo_requests.labels(self.model, "met" if met else "missed").inc()

    @property
    def prompt_tokens(self) -> int:
        # one prompt may be shared by n choices; usage counts each prompt once, as OpenAI does
        return sum(len(c.request.prompt_token_ids) for c in self.choices[:: self.n])

    @property
    def completion_tokens(self) -> int:
        # tokens the text side kept: none after a stop string
        return sum(len(c.text.token_ids) for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (each prompt once, as prompt_tokens)."""
        return sum(c.cached_tokens for c in self.choices[:: self.n])

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class RunStream(StreamingResponse):
    """A streamed answer of a started run that ends the run however the response ends: a
    client that left before the first byte cancels the response before its generator ever
    starts, and that generator's own clean-up would then never run (the call would hold its
    tenant's slot, its lease renewed, for ever)."""

    def __init__(self, content, run: Run):
        super().__init__(content, media_type="text/event-stream")
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.run.done:
                self.run.abort()
                self.run._count()


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


# ---- logprobs -------------------------------------------------------------------------------
def _lp(value: float) -> float:
    """JSON has no infinities: a -inf log-probability is reported as -9999.0 (as vLLM does)."""
    return value if math.isfinite(value) else -9999.0


def _token_text(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid]) if tokenizer is not None else str(tid)


def _new_logprobs(out: RequestOutput):
    """The logprobs of the tokens this update added (one entry per output token)."""
    if out.logprobs is None:
        return None
    return out.logprobs[len(out.token_ids) - len(out.delta_token_ids):]


def _completion_logprobs(tokenizer, lps, text_start: int = 0):
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_start
    for tid, lp, top in lps:  # lp None: an echoed prompt's first token
        t = _token_text(tokenizer, tid)
        tokens.append(t)
        token_lps.append(None if lp is None else _lp(lp))
        # vLLM's rule: the sampled token is always among them (logprobs: 0 gives just it)
        tops.append(None if lp is None else
                    {t: _lp(lp), **{_token_text(tokenizer, i): _lp(v) for i, v in top}})
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


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


def _score(req: CompletionRequest, choices: list[dict], outs, tokenizer, usage: dict):
    """Completions that score a prompt: max_tokens 0 returns no token (its one computed
    token dropped, none counted); echo with logprobs starts the logprobs with the prompt's
    (OpenAI's legacy format: None for the first token; top alternatives as many as
    ``logprobs``), prompt_logprobs only where asked."""
    zero = req.max_tokens == 0
    if zero:
        usage["completion_tokens"], usage["total_tokens"] = 0, usage["prompt_tokens"]
    for c, out in zip(choices, outs):
        generated = () if zero else out.logprobs or ()
        if zero:
            c["text"] = ""
        if req.scores_prompt:
            scored = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            prompt = [(tid, None, ()) if e is None else (tid, e[1], e[2][:req.logprobs])
                      for tid, e in zip(out.prompt_token_ids, scored)]
            c["logprobs"] = _completion_logprobs(tokenizer, prompt + list(generated))
            if req.prompt_logprobs is None:
                c["prompt_logprobs"] = None
        elif zero and c["logprobs"] is not None:
            c["logprobs"] = _completion_logprobs(tokenizer, generated)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- what differs between the two routes ----------------------------------------------------
def _completion_prompts(req: CompletionRequest, tokenizer, info: ModelInfo) -> list[list[int]]:
    prompts = req.prompts()
    out = []
    for i, prompt in enumerate(prompts):
        try:
            out.append(tokenize(tokenizer, prompt, info.vocab_size))
        except RequestError as e:
            raise APIError(400, f"prompt {i}: {e}" if len(prompts) > 1 else str(e),
                           param="prompt") from None
    return out


def _chat_prompts(req: ChatCompletionRequest, tokenizer, info: ModelInfo) -> list[list[int]]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {req.model!r} has no chat template; use /v1/completions",
                       param="model")
    messages = [_template_message(m) for m in req.messages]
    tools = None
    if req.tool_choice_value() != "none":
        if tool_format(tokenizer) is None:
            raise APIError(400, f"model {req.model!r}'s chat template takes no tools (it "
                                "could not call them)", param="tools")
        tools = req.tools
    options = template_options(req)
    try:
        return [chat_prompt(tokenizer, messages, tools, **options)]
    except RequestError as e:
        raise APIError(400, str(e), param="messages") from e


def _template_message(m) -> dict:
    """A message as chat templates take it: an assistant's tool_calls with their arguments
    as objects (the templates serialise them), a tool result with its call's id."""
    out = {"role": m.role, "content": m.text()}
    extra = m.model_extra or {}
    if m.role == "assistant" and extra.get("tool_calls"):
        calls = []
        for c in extra["tool_calls"]:
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, "tool_calls entries need function.name", param="messages")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                raise APIError(400, "tool_calls arguments must be JSON", param="messages") from None
            calls.append({"id": c.get("id"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = calls
    if m.role == "tool":
        out["tool_call_id"] = extra.get("tool_call_id")
    if m.name:
        out["name"] = m.name
    return out


@dataclass(frozen=True)
class _Route:
    path: str
    body: type
    prompts: Callable  # (req, tokenizer, info) -> token ids per prompt
    prompt_param: str
    default_max_tokens: int | None
    id_prefix: str
    obj: str  # the object name of a whole answer
    chunk_obj: str  # ... and of a streamed chunk

    def max_tokens(self, req):
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            return req.max_completion_tokens
        return req.max_tokens

    def logprobs(self, req) -> int | None:
        if isinstance(req, ChatCompletionRequest):
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs

    def choice(self, i: int, out: RequestOutput, tokenizer, tools: str | None = None,
               think: tuple | None = None) -> dict:
        if self.body is ChatCompletionRequest:
            reasoning, content, calls = read_answer(out.text, out.prompt_token_ids, think,
                                                    tools)
            message = {"role": "assistant"}
            if think is not None:  # a thinking model: its reasoning apart, calls in content
                message["reasoning_content"] = reasoning
            reason = _finish_reason(out)
            message.update(content=content, tool_calls=[_tool_call(t) for t in calls])
            c = {"index": i, "message": message,
                 "logprobs": _chat_logprobs(tokenizer, out.logprobs),
                 "finish_reason": "tool_calls" if calls and reason == "stop" else reason}
        else:
            c = {"index": i, "text": out.text,
                 "logprobs": _completion_logprobs(tokenizer, out.logprobs),
                 "finish_reason": _finish_reason(out)}
        if self.body is not ChatCompletionRequest:  # chat: once, at the top level (vLLM)
            c["prompt_logprobs"] = (None if out.prompt_logprobs is None
                                    else _prompt_logprobs(tokenizer, out.prompt_logprobs))
        return c

    def opening(self, run: Run) -> list[dict]:
        """Chunks sent before any token: the chat route names the role of each choice."""
        if self.body is not ChatCompletionRequest:
            return []
        return [{"index": ch.index, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None} for ch in run.choices]

    def chunks(self, ch: _Choice, out: RequestOutput, tokenizer, offsets: dict,
               tools: str | None = None, think: tuple | None = None):
        """The chunk choices for one update (maybe none), one at a time: text already
        generated goes out before a failure's error event. With ``tools`` (the model's
        tool-call format) text that may be a call is held back until the output ends; with
        ``think`` (a thinking model's markers) reasoning goes out as reasoning_content."""
        new = _new_logprobs(out)
        if self.body is ChatCompletionRequest:
            lps = _chat_logprobs(tokenizer, new)
            answer = offsets.get(("answer", ch.index))
            if answer is None:
                answer = offsets[("answer", ch.index)] = AnswerStream(
                    out.prompt_token_ids, think, tools)
            reasoning, text = answer.feed(out.delta_text, out.finished)
            delta = {"reasoning_content": reasoning} if reasoning else {}
            if text or (lps and not reasoning):
                delta["content"] = text
            if delta:
                yield {"index": ch.index, "delta": delta, "logprobs": lps,
                       "finish_reason": None}
            if out.finished:
                reason = _finish_reason(out)
                rest, calls = answer.finish()
                if rest:
                    yield {"index": ch.index, "delta": {"content": rest},
                           "logprobs": None, "finish_reason": None}
                if calls:
                    yield {"index": ch.index, "delta": {"tool_calls": [
                        {"index": k, **_tool_call(t)} for k, t in enumerate(calls)]},
                        "logprobs": None, "finish_reason": None}
                yield {"index": ch.index, "delta": {}, "logprobs": None,
                       "finish_reason": "tool_calls" if calls and reason == "stop" else reason}
            return
        lps = _completion_logprobs(tokenizer, new, offsets.get(ch.index, 0))
        if lps and lps["tokens"]:  # characters of token text already sent, per choice
            offsets[ch.index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
        if out.delta_text or out.finished or lps:
            yield {"index": ch.index, "text": out.delta_text, "logprobs": lps,
                   "finish_reason": _finish_reason(out) if out.finished else None,
                   "prompt_logprobs": None}


def _tool_call(t) -> dict:
    return {"id": t.id, "type": "function",
            "function": {"name": t.name, "arguments": t.arguments}}


def _prompt_logprobs(tokenizer, entries) -> list:
    """vLLM's shape: None for the first token, then {id: {logprob, rank, decoded_token}} for
    the token (its rank in the whole vocabulary) and its top alternatives."""
    out = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        token, lp, top, rank = e
        ranks = {t: r + 1 for r, (t, _) in enumerate(top)}
        d = {str(token): {"logprob": lp, "rank": rank,
                          "decoded_token": tokenizer.decode([token])}}
        for t, v in top:
            d.setdefault(str(t), {"logprob": v, "rank": ranks[t],
                                  "decoded_token": tokenizer.decode([t])})
        out.append(d)
    return out


COMPLETIONS = _Route("/v1/completions", CompletionRequest, _completion_prompts, "prompt", 16,
                     "cmpl", "text_completion", "text_completion")
CHAT = _Route("/v1/chat/completions", ChatCompletionRequest, _chat_prompts, "messages", None,
              "chatcmpl", "chat.completion", "chat.completion.chunk")


# ---- the one completion path ----------------------------------------------------------------
def _model(state, name: str) -> tuple[ModelInfo, object]:
    info = state.client.model_info(name)
    if info is None:
        raise model_not_found(name)
    try:
        return info, state.client.tokenizer(name)
    except (EngineError, KeyError):  # removed just now
        raise model_not_found(name) from None


def _choices(route: _Route, req, tenant: Tenant | None, info: ModelInfo,
             tokenizer, prompts: list[list[int]], call_id: str,
             think: tuple | None = None) -> list[_Choice]:
    """One choice per prompt and ``n``: its engine request (max_tokens checked against the
    context; choice k of a seeded call uses seed + k) and its text stream. A thinking
    model's (``think``: its markers) grammar starts after its reasoning."""
    out = []
    asked = route.max_tokens(req)
    if asked == 0 and route is COMPLETIONS:  # scoring: one token computed, none returned
        asked = 1
    for prompt in prompts:
        try:
            max_tokens = max_tokens_for(info, len(prompt), asked,
                                        route.default_max_tokens, route.prompt_param)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=e.param,
                           code="context_length_exceeded") from None
        for k in range(req.n):
            # choice k's seed, wrapped into the signed 64-bit range
            seed = None if req.seed is None else (req.seed + k + 2**63) % 2**64 - 2**63
            params = sampling_params(req, max_tokens, route.logprobs(req), seed, tokenizer)
            if think is not None and params.structured is not None and not is_harmony(think):
                state = prompt_state(prompt, think)
                if state != "closed":
                    params = dataclasses.replace(params,
                                                 reasoning=(*think[:2], state == "inside"))
            rid = f"{call_id}-{len(out)}"
            salt = tenant.cache_salt(req.cache_salt) if tenant else req.cache_salt
            engine_req = EngineRequest(rid, req.model, prompt, params,
                                       tenant.name if tenant else None, cache_salt=salt)
            out.append(_Choice(len(out), engine_req, TextStream(
                rid, req.model, tokenizer, prompt, params,
                keep_special=is_harmony(think))))  # (its parser reads the markers)
    return out


def check_queue(state, incoming: int) -> None:
    """503 (retry later) when ``incoming`` more requests would pass the server's queue."""
    if state.client.num_unfinished() + incoming > state.config.max_queued_requests:
        raise APIError(503, "the server's request queue is full; retry later",
                       code="queue_full", headers={"Retry-After": "1"})


@dataclass
class Call:
    """A started call: its run, the model's tokenizer, prompts, and how its answers are read
    (``tools``: the model's tool-call format when they may hold calls; ``think``: a thinking
    model's markers)."""
    run: Run
    tokenizer: object
    prompts: list[list[int]]
    tools: str | None
    think: tuple | None


async def start_call(state, tenant: Tenant | None, req, route: _Route) -> Call:
    """Check, tokenize and submit a parsed completion or chat request (shared with
    /v1/responses, which makes a chat request of its input)."""
    check_model_access(state, tenant, req.model)
    await state.models.ensure(req.model)
    incoming = req.n * (len(req.prompts()) if isinstance(req, CompletionRequest) else 1)
    if incoming > state.config.max_queued_requests:  # could never be admitted: not a 503
        raise APIError(400, f"the request makes {incoming} choices (n x prompts); the server "
                            f"queues at most {state.config.max_queued_requests}", param="n")
    check_queue(state, incoming)
    info, tokenizer = _model(state, req.model)
    spec = state.models.spec_of(req.model)
    if spec.get("task") == "embed":
        raise APIError(400, f"model {req.model!r} is an embedding model (task embed); use "
                            "/v1/embeddings", param="model")
    think = None  # a thinking model's markers: its chat answers' reasoning apart
    if route is CHAT and spec.get("reasoning_parser"):
        think = reasoning_markers(tokenizer, spec["reasoning_parser"])
    prompts = await asyncio.to_thread(route.prompts, req, tokenizer, info)
    run = Run(state, req.model, tenant, n=req.n)
    # off the event loop: bad_words are tokenized here (thousands of them take seconds)
    choices = await asyncio.to_thread(_choices, route, req, tenant, info, tokenizer, prompts,
                                      run.call_id, think)
    await run.start(choices)
    tools = None  # the model's tool-call format, when the answer may hold calls
    if (isinstance(req, ChatCompletionRequest) and req.tool_choice_value() != "none"
            and not is_harmony(think)):  # (harmony's calls are its parser's)
        tools = tool_format(tokenizer)
    return Call(run, tokenizer, prompts, tools, think)


async def _complete(state, request: Request, tenant_path: str | None, route: _Route):
    tenant = await authenticate(state, request, tenant_path)
    body = await read_json(request, state.config.max_body_bytes)
    req = parse(route.body, body, route.path)
    call = await start_call(state, tenant, req, route)
    run, tokenizer, prompts, tools, think = (call.run, call.tokenizer, call.prompts,
                                             call.tools, call.think)
    cid, created = f"{route.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def answer(obj: str, choices: list[dict]) -> dict:
        return {"id": cid, "object": obj, "created": created, "model": req.model,
                "choices": choices}

    echo = [""] * len(run.choices)  # completions' echo: each choice's prompt text first
    if getattr(req, "echo", False):
        texts = [p if isinstance(p, str) else tokenizer.decode(ids)
                 for p, ids in zip(req.prompts(), prompts)]
        echo = [texts[i // req.n] for i in range(len(run.choices))]

    if not req.stream:
        outs = await _collect(run, request)
        await run.released()
        if outs is None:
            return Response(status_code=499)  # nobody is listening any more
        choices = [route.choice(i, out, tokenizer, tools, think)
                   for i, out in enumerate(outs)]
        usage = run.usage()
        if isinstance(req, CompletionRequest):
            _score(req, choices, outs, tokenizer, usage)
        for c in choices:
            if echo[c["index"]]:
                c["text"] = echo[c["index"]] + c["text"]
        body = {**answer(route.obj, choices), "usage": usage}
        if isinstance(req, ChatCompletionRequest):  # the prompt's, once (vLLM's place)
            first = outs[0].prompt_logprobs if outs else None
            body["prompt_logprobs"] = (None if first is None
                                       else _prompt_logprobs(tokenizer, first))
        return JSONResponse(body)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict]) -> str:
        c = answer(route.chunk_obj, choices)
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def stream():
        offsets: dict[int, int] = {}
        try:
            for opening in route.opening(run):
                yield chunk([opening])
            for i, text in enumerate(echo):
                if text:
                    yield chunk([{"index": i, "text": text, "logprobs": None,
                                  "finish_reason": None, "prompt_logprobs": None}])
            async for ch, out in run.events():
                for part in route.chunks(ch, out, tokenizer, offsets, tools, think):
                    yield chunk([part])
            if include_usage:
                yield _sse({**answer(route.chunk_obj, []), "usage": run.usage()})
        except APIError as e:
            yield _sse(e.body())
        finally:  # the client left before events() began (or it never ran): abort, count
            if not run.done:
                run.abort()
                run._count()
        await run.released()
        yield "data: [DONE]\n\n"

    return RunStream(stream(), run)


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


async def tokenize_route(state, request: Request, tenant_path: str | None = None):
    """vLLM's ``/tokenize``: ``{count, max_model_len, tokens}``."""
    tenant = await authenticate(state, request, tenant_path)
    req = validate(TokenizeRequest, await read_json(request, state.config.max_body_bytes))
    check_model_access(state, tenant, req.model)
    info, tokenizer = _model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if tokenizer is None:
        raise APIError(400, f"model {req.model!r} has no tokenizer", param="model")
    if req.messages is not None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {req.model!r} has no chat template", param="messages")

    def ids_of() -> list[int]:  # in a thread: megabytes of text take seconds
        if req.messages is not None:
            messages = [_template_message(m) for m in req.messages]  # as the chat route
            try:
                return chat_prompt(tokenizer, messages, req.tools, **template_options(req))
            except RequestError as e:
                raise APIError(400, str(e), param="messages") from e
        special = True if req.add_special_tokens is None else req.add_special_tokens
        return list(tokenizer(req.prompt, add_special_tokens=special)["input_ids"])

    ids = await asyncio.to_thread(ids_of)
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": info.context_limit,
                         "tokens": ids, "token_strs": strs})


async def detokenize_route(state, request: Request, tenant_path: str | None = None):
    """vLLM's ``/detokenize``: ``{prompt}``."""
    tenant = await authenticate(state, request, tenant_path)
    req = validate(DetokenizeRequest, await read_json(request, state.config.max_body_bytes))
    check_model_access(state, tenant, req.model)
    info, tokenizer = _model(state, req.model)
    if any(not 0 <= t < info.vocab_size for t in req.tokens):
        raise APIError(400, f"tokens must be integers in [0, {info.vocab_size})",
                       param="tokens")
    if tokenizer is None:
        raise APIError(400, f"model {req.model!r} has no tokenizer", param="model")
    return JSONResponse({"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens)})


async def version_route(request: Request):
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("gpupool")
    except PackageNotFoundError:
        v = "unknown"
    return JSONResponse({"version": v})


def router(state) -> APIRouter:
    # they build on this module
    from gpupool.api.embeddings import embeddings_route
    from gpupool.api.responses import create_response, delete_response, get_response

    r = APIRouter()
    def plain(fn):  # the handler's only parameter is the request (others become query ones)
        async def handler(request: Request):
            return await fn(state, request)
        return handler

    for path, fn, kind in (("/tokenize", tokenize_route, "tokenize"),
                           ("/detokenize", detokenize_route, "detokenize")):
        r.add_api_route(path, plain(fn), methods=["POST"], **openapi.openai_route(kind, path))
    r.add_api_route("/version", version_route, methods=["GET"],
                    **openapi.openai_route("version", "/version"))
    for prefix in ("/v1", "/tenants/{tenant}/v1"):
        def bind(fn, *args):
            async def handler(request: Request):
                return await fn(state, request, request.path_params.get("tenant"), *args)
            return handler

        async def one_model(request: Request):
            return await get_model(state, request, request.path_params["model"],
                                   request.path_params.get("tenant"))

        for path, fn, kind, method in (
                ("/models", bind(list_models), "models", "GET"),
                ("/models/{model:path}", one_model, "model", "GET"),
                ("/completions", bind(_complete, COMPLETIONS), "completions", "POST"),
                ("/chat/completions", bind(_complete, CHAT), "chat", "POST"),
                ("/embeddings", bind(embeddings_route), "embeddings", "POST"),
                ("/responses", bind(create_response), "responses", "POST"),
                ("/responses/{response_id}", bind(get_response), "response", "GET"),
                ("/responses/{response_id}", bind(delete_response), "response_delete",
                 "DELETE")):
            r.add_api_route(prefix + path, fn, methods=[method],
                            **openapi.openai_route(kind, prefix + path))
    return r


__all__ = ["router", "Tenant"]
