"""OpenAI's Responses API: ``POST /v1/responses`` (whole or streamed), ``GET`` and ``DELETE
/v1/responses/{id}``.

A response request becomes a chat request (its ``input`` items as chat messages after the
``instructions`` and the conversation of ``previous_response_id``; flat function tools as
chat tools; ``text.format`` as ``response_format``) and runs the chat route's path
(``routes_openai.start_call``): the same template, grammars, tool-call parsing and reasoning
parser. Its answer is written as output items: a ``reasoning`` item for a thinking model's
reasoning, a ``message`` with one ``output_text`` part, a ``function_call`` per call. A
streamed answer sends OpenAI's events in their order (``response.created``, items added,
text deltas, items done, ``response.completed``), with a ``sequence_number`` each. An
answer cut by ``max_output_tokens`` is ``status: "incomplete"`` and ends with
``response.completed`` (vLLM's choice: OpenAI's ``response.incomplete`` makes the openai
client's ``responses.stream()`` raise).

Stored responses (``store``, true by default) live in the state store per tenant (another
tenant's id is a 404) with a TTL and a size cap (``responses_ttl_s``,
``responses_max_bytes``): every gateway of a cluster finds them. The record keeps the chat
messages before the answer (without instructions, which OpenAI does not carry over).
Refused: background mode, built-in tools (web search, file search, ...), ``include``,
``truncation: "auto"``, non-text content.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gpupool.api.auth import authenticate
from gpupool.api.errors import APIError
from gpupool.api.protocol import ChatCompletionRequest, parse
from gpupool.api.routes_openai import CHAT, Call, RunStream, _collect, start_call
from gpupool.api.util import read_json
from gpupool.frontend.reasoning import AnswerStream, read_answer

logger = logging.getLogger(__name__)
PATH = "/v1/responses"


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    include: list[str] | None = None

    def check_unsupported(self, body: dict) -> None:
        for name, bad in (("background", self.background), ("include", self.include),
                          ("truncation", self.truncation == "auto"),
                          ("conversation", body.get("conversation") is not None),
                          ("prompt", body.get("prompt") is not None)):
            if bad:
                raise APIError(400, f"{name} is not supported", param=name,
                               code="unsupported_field")


# ---- the request as a chat request --------------------------------------------------------
def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of parts",
                       param="input")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        key = {"input_text": "text", "output_text": "text", "text": "text",
               "refusal": "refusal"}.get(kind)
        if key is None or not isinstance(p.get(key), str):
            raise APIError(400, f"{where}: content parts of type {kind!r} are not supported "
                                "(text only)", param="input")
        parts.append(p[key])
    return "".join(parts)


def _str_field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where}: {key} must be a non-empty string", param="input")
    return value


def to_messages(items: list, where: str = "input") -> list[dict]:
    """Input (or stored output) items as chat messages: function calls join the assistant
    message before them, their outputs become tool messages, reasoning items are dropped."""
    out: list[dict] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{at} must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{at}: role must be user, system, developer or "
                                    "assistant", param="input")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text(item.get("content"), at)})
        elif kind == "function_call":
            call = {"id": _str_field(item, "call_id", at), "type": "function",
                    "function": {"name": _str_field(item, "name", at),
                                 "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": _str_field(item, "call_id", at),
                        "content": _text(item.get("output"), at)})
        elif kind != "reasoning":
            raise APIError(400, f"{at}: items of type {kind!r} are not supported",
                           param="input")
    return out


def _chat_tools(req: ResponsesRequest) -> tuple[list | None, Any]:
    tools = []
    for t in req.tools:
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise APIError(400, f"tools of type {kind!r} are not supported (function tools "
                                "are)", param="tools", code="unsupported_field")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise APIError(400, "tool_choice must be none, auto, required or "
                                '{"type": "function", "name": <a tool>}', param="tool_choice")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools or None, choice


def _response_format(req: ResponsesRequest) -> dict | None:
    fmt = (req.text or {}).get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise APIError(400, "text.format must be text, json_object or json_schema",
                       param="text")
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "text.format.schema must be a JSON schema", param="text")
    return {"type": "json_schema", "json_schema": {
        "name": fmt.get("name", "response"), "schema": fmt["schema"],
        "strict": fmt.get("strict")}}


def chat_request(req: ResponsesRequest, before: list[dict]) -> tuple[ChatCompletionRequest,
                                                                      list[dict]]:
    """(the chat request, the conversation to store: ``before`` and this input)."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) \
        else req.input
    conversation = before + to_messages(items)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools, choice = _chat_tools(req)
    body = {"model": req.model, "messages": system + conversation,
            "max_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": tools, "tool_choice": choice,
            "response_format": _response_format(req), "user": req.user}
    if not body["messages"]:
        raise APIError(400, "input is empty", param="input")
    return parse(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None},
                 PATH), conversation


# ---- the answer as output items -------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message(text: str, status: str = "completed", mid: str | None = None) -> dict:
    return {"id": mid or _id("msg"), "type": "message", "role": "assistant",
            "status": status, "content": [{"type": "output_text", "text": text,
                                            "annotations": [], "logprobs": []}]}


def _reasoning(text: str, status: str = "completed", rid: str | None = None) -> dict:
    return {"id": rid or _id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def _function_call(call) -> dict:
    return {"id": _id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": "completed"}


def _reasoning_tokens(token_ids, think, reasoned: bool) -> int:
    if not reasoned:
        return 0
    ids = list(token_ids)
    return ids.index(think[1]) + 1 if think[1] in ids else len(ids)


class _Answer:
    """The response object, built as the answer comes in."""

    def __init__(self, req: ResponsesRequest, call: Call | None = None):
        self.req, self.call = req, call
        self.id, self.created = _id("resp"), int(time.time())
        self.output: list[dict] = []

    def body(self, status: str, usage: dict | None = None, error: dict | None = None,
             incomplete: bool = False) -> dict:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None, "model": req.model, "output": list(self.output),
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None, **(req.reasoning or {})},
            "service_tier": "default", "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
            "tools": req.tools, "top_logprobs": 0,
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {}}

    def usage(self, out, reasoned: bool) -> dict:
        run = self.call.run
        return {"input_tokens": run.prompt_tokens,
                "input_tokens_details": {"cached_tokens": run.cached_tokens},
                "output_tokens": run.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": _reasoning_tokens(
                    out.token_ids, self.call.think, reasoned) if self.call.think else 0},
                "total_tokens": run.prompt_tokens + run.completion_tokens}

    def calls(self, calls: list) -> list:
        """The calls the answer gives (the first only without parallel_tool_calls)."""
        return calls if self.req.parallel_tool_calls else calls[:1]


def _whole(answer: _Answer, out) -> tuple[dict, bool]:
    """The whole answer's body from the final output; whether it was cut short."""
    call = answer.call
    reasoning, content, calls = read_answer(out.text, out.prompt_token_ids, call.think,
                                            call.tools)
    calls = answer.calls(calls)
    if reasoning is not None:
        answer.output.append(_reasoning(reasoning))
    if content or not calls:
        answer.output.append(_message(content or ""))
    answer.output.extend(_function_call(c) for c in calls)
    cut = out.finish_reason == "length"
    if cut:
        answer.output[-1]["status"] = "incomplete"
    return answer.body("incomplete" if cut else "completed",
                       answer.usage(out, reasoning is not None), incomplete=cut), cut


# ---- streaming ----------------------------------------------------------------------------
class _Events:
    """OpenAI's server-sent events, numbered, for one streamed answer."""

    def __init__(self, answer: _Answer):
        self.answer, self.seq = answer, 0
        self.open: dict | None = None  # the item being written: reasoning or message
        self.had_message = False

    def __call__(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def _start(self, item: dict, part: dict) -> list[str]:
        index = len(self.answer.output)
        self.answer.output.append(item)
        self.open = {"item": item, "index": index, "text": "", "part": part}
        return [self("response.output_item.added", output_index=index,
                     item={**item, "status": "in_progress", "content": []}),
                self("response.content_part.added", item_id=item["id"], output_index=index,
                     content_index=0, part=part)]

    def close(self, status: str = "completed") -> list[str]:
        if self.open is None:
            return []
        o, self.open = self.open, None
        item, text = o["item"], o["text"]
        reasoning = item["type"] == "reasoning"
        done = (_reasoning if reasoning else _message)(text, status, item["id"])
        self.answer.output[o["index"]] = done
        where = {"item_id": item["id"], "output_index": o["index"], "content_index": 0}
        kind = "response.reasoning_text.done" if reasoning else "response.output_text.done"
        extra = {} if reasoning else {"logprobs": []}
        return [self(kind, **where, text=text, **extra),
                self("response.content_part.done", **where, part=done["content"][0]),
                self("response.output_item.done", output_index=o["index"], item=done)]

    def text(self, delta: str, reasoning: bool) -> list[str]:
        kind = "reasoning" if reasoning else "message"
        events = []
        if self.open is None or self.open["item"]["type"] != kind:
            events += self.close()
            if reasoning:
                events += self._start(_reasoning(""), {"type": "reasoning_text", "text": ""})
            else:
                self.had_message = True
                events += self._start(_message(""), _message("")["content"][0])
        if not delta:
            return events
        o = self.open
        o["text"] += delta
        where = {"item_id": o["item"]["id"], "output_index": o["index"], "content_index": 0}
        if reasoning:
            return events + [self("response.reasoning_text.delta", **where, delta=delta)]
        return events + [self("response.output_text.delta", **where, delta=delta,
                              logprobs=[])]

    def function_call(self, call) -> list[str]:
        item = _function_call(call)
        index = len(self.answer.output)
        self.answer.output.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [self("response.output_item.added", output_index=index,
                     item={**item, "arguments": "", "status": "in_progress"}),
                self("response.function_call_arguments.delta", **where,
                     delta=call.arguments),
                self("response.function_call_arguments.done", **where, name=call.name,
                     arguments=call.arguments),
                self("response.output_item.done", output_index=index, item=item)]


def _stream(answer: _Answer, store):
    call, run = answer.call, answer.call.run
    ev = _Events(answer)
    reader = AnswerStream(call.prompts[0], call.think, call.tools)

    def update(out) -> list[str]:
        reasoning, content = reader.feed(out.delta_text, out.finished)
        events = []
        if reasoning or (reader.reasoned and not answer.output):
            events += ev.text(reasoning, reasoning=True)
        if content:
            events += ev.text(content, reasoning=False)
        if not out.finished:
            return events
        rest, calls = reader.finish()
        if rest:
            events += ev.text(rest, reasoning=False)
        calls = answer.calls(calls)
        cut = out.finish_reason == "length"
        if not ev.had_message and not calls:  # an answer always has its message
            events += ev.text("", reasoning=False)
        events += ev.close("incomplete" if cut and not calls else "completed")
        for c in calls:
            events += ev.function_call(c)
        body = answer.body("incomplete" if cut else "completed",
                           answer.usage(out, reader.reasoned), incomplete=cut)
        store(body)
        return events + [ev("response.completed", response=body)]

    async def events():
        yield ev("response.created", response=answer.body("in_progress"))
        yield ev("response.in_progress", response=answer.body("in_progress"))
        try:
            async for _, out in run.events():
                if out.error:
                    body = answer.body("failed", error={"code": "server_error",
                                                        "message": out.error})
                    yield ev("response.failed", response=body)
                    return
                for e in update(out):
                    yield e
        finally:
            if not run.done:
                run.abort()
                run._count()
            await run.released()

    return events()


# ---- the routes -----------------------------------------------------------------------------
def _owner(tenant) -> str:
    return tenant.name if tenant is not None else ""


def _not_found(rid: str, param: str = "response_id", code: str | None = None) -> APIError:
    return APIError(404, f"response with id {rid!r} not found", param=param, code=code)


async def create_response(state, request: Request, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    req = parse(ResponsesRequest, await read_json(request, state.config.max_body_bytes), PATH)
    before = []
    if req.previous_response_id is not None:
        record = state.store.get_response(_owner(tenant), req.previous_response_id)
        if record is None:
            raise _not_found(req.previous_response_id, "previous_response_id",
                             "previous_response_not_found")
        before = record["messages"] + to_messages(record["response"]["output"], "output")
    chat, conversation = chat_request(req, before)
    answer = _Answer(req)
    answer.call = await start_call(state, tenant, chat, CHAT)

    def store(body: dict) -> None:
        if not req.store:
            return
        record = {"response": body, "messages": conversation}
        size = len(json.dumps(record).encode())
        if size > state.config.responses_max_bytes:
            logger.warning("response %s not stored: %d bytes, over responses_max_bytes",
                           answer.id, size)
            body["store"] = False
            return
        try:  # the answer is the client's whatever becomes of its copy
            state.store.put_response(_owner(tenant), answer.id, record,
                                     state.config.responses_ttl_s)
        except Exception as e:  # noqa: BLE001 (Redis errors)
            logger.warning("response %s not stored: %s", answer.id, e)
            body["store"] = False

    if req.stream:
        return RunStream(_stream(answer, store), answer.call.run)
    outs = await _collect(answer.call.run, request)
    await answer.call.run.released()
    if outs is None:
        return Response(status_code=499)  # nobody is listening any more
    if outs[0].error:
        raise APIError(500, f"generation failed: {outs[0].error}", code="generation_failed")
    body, _ = _whole(answer, outs[0])
    store(body)
    return JSONResponse(body)


async def get_response(state, request: Request, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    rid = request.path_params["response_id"]
    record = state.store.get_response(_owner(tenant), rid)
    if record is None:
        raise _not_found(rid)
    return JSONResponse(record["response"])


async def delete_response(state, request: Request, tenant_path: str | None = None):
    tenant = await authenticate(state, request, tenant_path)
    rid = request.path_params["response_id"]
    if not state.store.delete_response(_owner(tenant), rid):
        raise _not_found(rid)
    return JSONResponse({"id": rid, "object": "response", "deleted": True})
