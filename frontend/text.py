"""The text side of a request, in one place: chat template, tokenising (once), the context
check (once, with the messages users see), incremental detokenising (once) and stop strings.

The engine sees token ids only. A :class:`TextStream` turns the engine's
:class:`~gpupool.messages.types.OutputDelta` messages into cumulative
:class:`RequestOutput` updates; when a stop string appears it ends the output there
(``stopped`` tells the caller to abort the engine request), and no token after the one that
completed the stop string is kept or counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpupool.frontend.detokenizer import DetokenizerState, append_token
from gpupool.messages.errors import RequestError, check_token_ids
from gpupool.messages.params import SamplingParams
from gpupool.messages.types import ModelInfo, OutputDelta


class ContextLengthError(RequestError):
    """The prompt, or prompt + max_tokens, does not fit the model's context."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestOutput:
    """Cumulative output of a request so far; ``delta_*`` is what this update added."""

    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    delta_token_ids: tuple[int, ...]
    delta_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that matched
    error: str | None = None
    # with SamplingParams.logprobs: one (token id, logprob, ((id, logprob), ...)) per token
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # with SamplingParams.prompt_logprobs: per prompt token (id, logprob, top alternatives,
    # its rank in the vocabulary), None for the first
    prompt_logprobs: tuple | None = None
    embedding: tuple[float, ...] | None = None  # SamplingParams.pooling: the pooled vector


def tokenize(tokenizer, prompt: str | list[int], vocab_size: int,
             add_special_tokens: bool = True) -> list[int]:
    """A prompt's token ids: a string through the tokenizer, or ids as given; RequestError if
    empty, untokenizable or out of the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty")
        if tokenizer is None:
            raise RequestError("this model has no tokenizer; pass token ids")
        try:
            ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        except (TypeError, ValueError, UnicodeError) as e:  # e.g. a lone surrogate
            raise RequestError(f"prompt cannot be tokenized: {e}") from None
    else:
        ids = list(prompt)
    if not ids:
        raise RequestError("prompt is empty")
    check_token_ids(ids, vocab_size)
    return ids


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: dict | None = None) -> list[int]:
    """The chat template applied to ``messages`` (with the generation prompt unless told
    otherwise, the last message left open with ``continue_final_message``, ``tools`` when
    given, ``template_kwargs`` passed to the template), tokenised without adding special
    tokens again; RequestError if there is no template or it refuses."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions")
    try:
        kw = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False,
            continue_final_message=continue_final_message, **kw)
    except Exception as e:  # a template may raise on an order of roles it does not allow
        raise RequestError(f"the chat template refused the messages: {e}") from e
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, UnicodeError) as e:
        raise RequestError(f"the messages cannot be tokenized: {e}") from e


def max_tokens_for(info: ModelInfo, prompt_len: int, max_tokens: int | None,
                   default: int | None, prompt_param: str = "prompt") -> int:
    """The request's max_tokens checked against the context: a missing one becomes
    ``default`` (None: all the room left), capped by the room; an explicit one beyond the
    room, or a prompt that leaves none, is a ContextLengthError."""
    limit = info.context_limit
    room = limit - prompt_len
    if room < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens, but this model's context holds {limit} "
            "tokens (prompt + at least one new token)", prompt_param)
    if max_tokens is None:
        return room if default is None else min(default, room)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > room:
        raise ContextLengthError(
            f"this model's context holds {limit} tokens, but the request asks for "
            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to "
            "generate); lower max_tokens", "max_tokens")
    return max_tokens


class TextStream:
    """One request's text: feed it the engine's deltas in order (repeats are dropped by
    index); each call returns the cumulative :class:`RequestOutput`, or None when nothing
    changed. ``stopped``: a stop string ended the output (abort the engine request)."""

    def __init__(self, request_id: str, model: str, tokenizer, prompt_token_ids,
                 params: SamplingParams, delivered_token_ids=(), keep_special: bool = False):
        """``keep_special``: special tokens stay in the text (a parser reads them: gpt-oss's
        harmony channels)."""
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.params = params
        self.detok = DetokenizerState.start(list(prompt_token_ids), not keep_special)
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.emitted_chars = self.emitted_tokens = 0
        self.finished = self.stopped = False
        self.stop_reason: str | int | None = None
        self.cached_tokens = 0
        self.prompt_logprobs: tuple | None = None
        self.embedding: tuple[float, ...] | None = None
        self.usage = None  # the engine's Usage, from the final delta
        for token in delivered_token_ids:  # a resumed request: its text so far, no checks
            self.token_ids.append(token)
            append_token(tokenizer, self.detok, token)
        self.detok.stop_checked_upto = len(self.detok.text)
        self.emitted_chars, self.emitted_tokens = len(self.detok.text), len(self.token_ids)

    @property
    def text(self) -> str:
        return self.detok.text

    def feed(self, delta: OutputDelta) -> RequestOutput | None:
        if self.finished:
            return None
        self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.embedding is not None:
            self.embedding = delta.embedding
        if delta.usage is not None:
            self.usage = delta.usage
        skip = len(self.token_ids) - delta.index
        if skip < 0:
            raise RequestError(f"request {self.request_id}: output tokens from "
                               f"{len(self.token_ids)} to {delta.index} never arrived")
        new = delta.token_ids[skip:]
        lps = delta.logprobs[skip:] if delta.logprobs is not None else ()
        last_is_stop_token = delta.finished and delta.stop_token is not None
        for k, token in enumerate(new):
            self.token_ids.append(token)
            if self.logprobs is not None and k < len(lps):
                self.logprobs.append(lps[k])
            append_token(self.tokenizer, self.detok, token)
            if last_is_stop_token and k == len(new) - 1:
                break  # the engine's stop token ends it: no stop string check on it
            if self._stop_string():
                self.stopped = self.finished = True
                return self._output("stop")
        if not new and not delta.finished:
            return None
        if delta.finished:
            self.finished = True
            if delta.stop_token is not None:
                self.stop_reason = delta.stop_token
            return self._output(delta.finish_reason, delta.error)
        return self._output(None)

    def _stop_string(self) -> bool:
        """Whether the text now holds a stop string (not before ``min_tokens``); if so the
        text ends before it (or after it, with ``include_stop_str_in_output``)."""
        p, state = self.params, self.detok
        if not p.stop or len(self.token_ids) < p.min_tokens:
            state.stop_checked_upto = len(state.text)
            return False
        text = state.text
        start = max(0, state.stop_checked_upto - max(len(s) for s in p.stop) + 1)
        hits = [(text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        state.stop_checked_upto = len(text)
        if not hits:
            return False
        idx, s = min(hits)
        state.text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
        self.stop_reason = s
        return True

    def _output(self, finish_reason: str | None, error: str | None = None) -> RequestOutput:
        text, finished = self.detok.text, finish_reason is not None
        visible = len(text)
        if not finished and self.params.stop:  # hold back what may start a stop string
            visible = max(self.emitted_chars,
                          len(text) - max(len(s) for s in self.params.stop) + 1)
        out = RequestOutput(
            request_id=self.request_id,
            model=self.model,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=tuple(self.token_ids),
            text=text[:visible],
            delta_token_ids=tuple(self.token_ids[self.emitted_tokens:]),
            delta_text=text[self.emitted_chars:visible],
            finished=finished,
            finish_reason=finish_reason,
            stop_reason=self.stop_reason,
            error=error,
            logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            cached_tokens=self.cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
            embedding=self.embedding,
        )
        self.emitted_chars, self.emitted_tokens = visible, len(self.token_ids)
        return out


def tool_format(tokenizer) -> str | None:
    """How the model's chat template writes tool calls: ``hermes`` (<tool_call> tags: Qwen2.5,
    Qwen3), ``llama3`` (JSON with "parameters": Llama 3.1), or None when the template takes
    no tools (SmolLM2's, for one)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3"
    return None
