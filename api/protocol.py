"""OpenAI request bodies (pydantic, strict types) and their mapping to SamplingParams.

Every field is honoured or refused. Fields nobody knows are ignored with one log line per
field name (newer clients keep working, as with vLLM); known fields that would change the
output in a way gpupool does not implement (``REFUSED``: tools, guided decoding, beam
search, ...) get a 400
naming the field unless they hold the value that changes nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpupool.api.errors import APIError
from gpupool.messages.params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_STOP = 1024  # stop strings, bad words
MAX_TOKEN_LIST = 1 << 18  # stop_token_ids, allowed_token_ids, logit_bias entries

# field -> the values that change nothing (absent counts as None)
REFUSED: dict[str, tuple] = {
    "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1), "truncate_prompt_tokens": (None,), "chat_template": (None,),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False), "prompt_embeds": (None,),
    "documents": (None, []), "mm_processor_kwargs": (None, {}), "reasoning_effort": (None,),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]),
    "detokenize": (None, True), "typical_p": (None, 1), "top_a": (None, 0),
    "tfs": (None, 1), "mirostat": (None, 0), "dry_multiplier": (None, 0),
    "xtc_probability": (None, 0), "repeat_last_n": (None,), "num_beams": (None, 1),
}
_warned_unknown: set[str] = set()  # unknown field names already logged once


def _same(value, neutral) -> bool:
    """JSON equality where 0 and 0.0 agree but False is not 0 and "1" is not 1."""
    if isinstance(value, bool) or isinstance(neutral, bool) or neutral is None:
        return value is neutral
    if isinstance(value, (int, float)) and isinstance(neutral, (int, float)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    min_p: float | None = None  # vLLM's extension
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # 64-bit signed, as vLLM
    # size limits: a request's cost on the event loop and in the engine stays bounded (a 400
    # naming the field past them)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_TOKEN_LIST)] | None = None
    include_stop_str_in_output: bool = False  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    min_tokens: int | None = None  # vLLM's extension
    repetition_penalty: float | None = None  # vLLM's extension
    allowed_token_ids: Annotated[list[int], Field(max_length=MAX_TOKEN_LIST)] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # token id (a string in JSON) -> bias
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_TOKEN_LIST)] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: requests with different salts never share cached prompt KV
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}
    response_format: dict[str, Any] | None = None
    # vLLM's: one of json (a schema), regex, choice (strings), grammar (EBNF)
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names of the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: never generated (as tokens, see below)
    bad_words: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's
    add_special_tokens: bool | None = None

    _default_add_special_tokens = True

    def check_unsupported(self, body: dict) -> None:
        for name, neutral in REFUSED.items():
            if not any(_same(body.get(name), v) for v in neutral):
                raise APIError(400, f"{name} is not supported", param=name,
                               code="unsupported_field")
        if (self.add_special_tokens is not None
                and self.add_special_tokens != self._default_add_special_tokens):
            raise APIError(400, f"add_special_tokens={self.add_special_tokens} is not "
                                "supported on this route", param="add_special_tokens",
                           code="unsupported_field")
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs is not supported with stream=true yet",
                           param="prompt_logprobs", code="unsupported_field")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true",
                           param="stream_options")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    echo: bool = False  # the prompt's text before each choice's

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the logprobs start with the prompt's (how harnesses score)."""
        return self.echo and self.logprobs is not None

    def check_unsupported(self, body: dict) -> None:
        super().check_unsupported(body)
        for name, neutral in (("tools", (None, [])), ("tool_choice", (None, "none")),
                              ("chat_template_kwargs", (None, {})),
                              ("add_generation_prompt", (None, True)),
                              ("continue_final_message", (None, False))):
            if not any(_same(body.get(name), n) for n in neutral):
                raise APIError(400, f"{name} is for /v1/chat/completions", param=name,
                               code="unsupported_field")
        if self.stream and (self.scores_prompt or self.max_tokens == 0):
            raise APIError(400, "echo with logprobs, and max_tokens 0 (scoring a prompt), are "
                                "not supported with stream=true", param="stream",
                           code="unsupported_field")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of",
                           code="unsupported_field")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)


# arguments of apply_chat_template that chat_template_kwargs may not set (the route sets them)
TEMPLATE_RESERVED = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"})


def template_options(req) -> dict:
    """The chat template's options of a chat or tokenize request (vLLM's fields): both of
    add_generation_prompt and continue_final_message true is a 400, as chat_template_kwargs
    setting an argument the route sets."""
    if req.add_generation_prompt and req.continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt false (both "
                            "true is contradictory)", param="continue_final_message")
    extra = req.chat_template_kwargs or {}
    clash = sorted(set(extra) & TEMPLATE_RESERVED)
    if clash:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}",
                       param="chat_template_kwargs")
    return {"add_generation_prompt": req.add_generation_prompt,
            "continue_final_message": req.continue_final_message, "template_kwargs": extra}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    # the chat template's options (vLLM's): prefill the assistant's answer with
    # continue_final_message (and add_generation_prompt false); chat_template_kwargs go to
    # the template (e.g. Qwen3's enable_thinking)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | a function
    parallel_tool_calls: bool | None = None  # accepted; a model writes what it writes

    _default_add_special_tokens = False  # the chat template places the special tokens

    def tool_choice_value(self) -> str | dict:
        """The checked tool choice: "none", "auto", "required" or {"name": ...}."""
        names = []
        for t in self.tools or ():
            fn = t.get("function") if isinstance(t, dict) else None
            if (not isinstance(t, dict) or t.get("type") != "function"
                    or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("parameters", {}), dict)):
                raise APIError(400, 'each tool must be {"type": "function", "function": '
                                    '{"name": ..., "parameters": {...}}}', param="tools")
            names.append(fn["name"])
        choice = self.tool_choice
        if choice is None:
            return "auto" if names else "none"
        if choice in ("none", "auto", "required"):
            if choice != "none" and not names:
                raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
            return choice
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or choice.get("type") != "function" or name not in names:
            raise APIError(400, "tool_choice must be none, auto, required or "
                                '{"type": "function", "function": {"name": <a tool>}}',
                           param="tool_choice")
        return {"name": name}

    def check_unsupported(self, body: dict) -> None:
        super().check_unsupported(body)
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def validate(cls: type[BaseModel], body: Any):
    """A JSON body as ``cls``; 400 in OpenAI format naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}",
                       param=str(err["loc"][0]) if err["loc"] else None) from None


def parse(cls: type[BaseModel], body: Any, route: str):
    """An OpenAI request body as ``cls``: validated, unknown fields logged, unsupported
    features refused."""
    req = validate(cls, body)
    req.check_unsupported(body)
    new = sorted(set(req.model_extra or ()) - set(REFUSED) - _warned_unknown)
    if new:  # once per field name, not once per request
        _warned_unknown.update(new)
        logger.warning("%s: ignoring unknown fields %s (logged once per field)", route,
                       ", ".join(new))
    return req


def structured(req: _Common) -> tuple[str, str] | None:
    """``response_format`` (OpenAI's shapes) or vLLM's ``structured_outputs`` /
    ``guided_*`` as SamplingParams.structured; 400 when malformed or more than one is set."""
    vllm = _vllm_structured(req)
    fmt = _response_format(req)
    if vllm is not None and fmt is not None:
        raise APIError(400, "give response_format or structured output fields, not both",
                       param="response_format")
    return vllm or fmt


def _one_structure(fmt, tool):
    if fmt is not None and tool is not None:
        raise APIError(400, "a required or named tool_choice cannot be combined with "
                            "response_format", param="tool_choice")
    return fmt or tool


def _vllm_structured(req: _Common) -> tuple[str, str] | None:
    so = dict(req.structured_outputs or {})
    for key, name in (("json", "guided_json"), ("regex", "guided_regex"),
                      ("choice", "guided_choice"), ("grammar", "guided_grammar")):
        if getattr(req, name) is not None:
            so.setdefault(key, getattr(req, name))
    given = {k: v for k, v in so.items() if v is not None}
    if not given:
        return None
    if len(given) > 1 or set(given) - {"json", "regex", "choice", "grammar"}:
        raise APIError(400, "structured output takes exactly one of json, regex, choice, "
                            "grammar", param="structured_outputs")
    (key, value), = given.items()
    if key == "json":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            schema = None
        if not isinstance(schema, dict):
            raise APIError(400, "a json structured output is a JSON schema object",
                           param="structured_outputs")
        return ("json_schema", json.dumps(schema))
    if key == "choice":
        return ("choice", json.dumps(value))
    return (key, value)


def _response_format(req: _Common) -> tuple[str, str] | None:
    rf = req.response_format
    kind = (rf or {}).get("type", "text")
    if not rf or kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", "")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON "
                                "schema object", param="response_format")
        return ("json_schema", json.dumps(schema))
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                        "json_schema)", param="response_format", code="unsupported_field")


def tool_structured(req: _Common, tokenizer) -> tuple[str, str] | None:
    """The grammar of a required or named tool call in the model's own format."""
    if not isinstance(req, ChatCompletionRequest):
        return None
    choice = req.tool_choice_value()
    if choice in ("none", "auto"):
        return None
    from gpupool.frontend.text import tool_format

    fmt = tool_format(tokenizer)
    key = "parameters" if fmt == "llama3" else "arguments"
    tools = [t["function"] for t in req.tools
             if choice == "required" or t["function"]["name"] == choice["name"]]
    variants = [{"type": "object", "properties": {
        "name": {"const": fn["name"]}, key: fn.get("parameters") or {"type": "object"}},
        "required": ["name", key], "additionalProperties": False} for fn in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    tags = ("<tool_call>\n", "\n</tool_call>") if fmt == "hermes" else ("", "")
    return ("tagged_json", json.dumps({"begin": tags[0], "schema": schema, "end": tags[1]}))


def bad_words_token_ids(req: _Common, tokenizer) -> list[list[int]] | None:
    """vLLM's tokenization of bad_words: each word alone and after a space (so it is banned
    at the start of the output and inside it)."""
    if not req.bad_words:
        return None
    if tokenizer is None:
        raise APIError(400, "bad_words needs the model's tokenizer", param="bad_words")
    out = []
    for word in req.bad_words:
        for text in (word, " " + word.lstrip()):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids and ids not in out:
                out.append(ids)
    if not out:
        raise APIError(400, "bad_words has nothing to ban", param="bad_words")
    return out


def sampling_params(req: _Common, max_tokens: int | None, logprobs: int | None,
                    seed: int | None, tokenizer=None) -> SamplingParams:
    """SamplingParams of one choice; 400 on a bad value. ``max_tokens`` is already resolved."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None or req.top_k == 0 else req.top_k,
            seed=seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            repetition_penalty=(1.0 if req.repetition_penalty is None
                                else req.repetition_penalty),
            min_p=0.0 if req.min_p is None else req.min_p,
            min_tokens=req.min_tokens or 0,
            allowed_token_ids=req.allowed_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            logit_bias=req.logit_bias or None,
            structured=_one_structure(structured(req), tool_structured(req, tokenizer)),
            bad_words_token_ids=bad_words_token_ids(req, tokenizer),
            prompt_logprobs=(max(req.prompt_logprobs or 0, req.logprobs)
                             if getattr(req, "scores_prompt", False) else req.prompt_logprobs),
        )
    except ValueError as e:
        word = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=word if word in _FIELDS else None) from None


_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
           "logprobs", "repetition_penalty", "min_p", "min_tokens", "allowed_token_ids",
           "include_stop_str_in_output", "frequency_penalty", "presence_penalty",
           "logit_bias"}


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt, or chat messages through the model's template."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    # with messages: the chat route's template options and tools
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False  # each token's string too (token_strs)


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per call


class EmbeddingRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | Annotated[list[int], Field(min_length=1)]
            | Annotated[list[Annotated[list[int], Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def check_unsupported(self, body: dict) -> None:
        """Every field is honoured (unknown ones are logged by ``parse``)."""

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    tokens: list[int] = Field(max_length=1 << 20)
