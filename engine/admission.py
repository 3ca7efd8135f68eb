"""Admission: the engine's own guard at its boundary. A remote client may send anything; the
front end has checked the same with messages for users (``gpupool.frontend.text``), and a
request that passes here can always run."""

from __future__ import annotations

from gpupool.adapters.base import AdapterError
from gpupool.engine.registry import ModelRegistry
from gpupool.messages.errors import RequestError, check_token_ids
from gpupool.messages.types import EngineRequest
from gpupool.pool.pages import PagePool


def check_request(registry: ModelRegistry, pages: PagePool, req: EngineRequest) -> int:
    """Raise RequestError if the request can never run; else its max total tokens."""
    base, adapter = registry.resolve(req.model)
    worker = registry.workers[base]
    _check_ids(req, worker.cfg.vocab_size)
    total = _check_length(req, worker.cfg.max_model_len)
    _check_params(req, worker)
    if req.params.structured is not None:
        _check_grammar(registry, req, worker.cfg.vocab_size)
    adapter_pages = 0  # its adapter's device copy shares the pool (adapters/paged.py)
    if adapter is not None:  # read now, not inside a step: a bad file fails this request
        try:
            worker.adapter_pages.load_host(adapter)
        except AdapterError as e:
            raise RequestError(f"adapter {adapter!r} could not be read: {e}") from None
        adapter_pages = worker.adapter_pages.pages_needed(adapter)
    room = max(0, pages.num_pages - adapter_pages)
    if registry.scheduler.peak_pages(base, total) > room:  # (a windowed model's: its window)
        capacity = registry.scheduler.max_tokens(base, room, total)
        raise RequestError(
            f"request needs up to {total} tokens of KV cache, but the pool holds "
            f"{capacity} tokens of model {req.model!r}; lower max_tokens or the prompt")
    return total


def _check_ids(req: EngineRequest, vocab: int) -> None:
    if not req.prompt_token_ids:
        raise RequestError("prompt is empty")
    for what, ids in (("prompt", req.prompt_token_ids), ("delivered", req.delivered_token_ids)):
        check_token_ids(ids, vocab, what)
    if len(req.delivered_token_ids) >= req.params.max_tokens:
        raise RequestError("a resumed request must have fewer delivered tokens than "
                           "max_tokens")


def _check_length(req: EngineRequest, max_len: int) -> int:
    """The request's most tokens (prompt + max_tokens), within the model's context."""
    prompt, model = req.prompt_token_ids, req.model
    if len(prompt) >= max_len:
        raise RequestError(
            f"prompt has {len(prompt)} tokens, but model {model!r} has a context "
            f"window of {max_len} tokens (prompt + at least one new token)")
    total = len(prompt) + req.params.max_tokens
    if total > max_len:
        raise RequestError(
            f"model {model!r} has a context window of {max_len} tokens, but the request "
            f"asks for {total} ({len(prompt)} in the prompt, max_tokens "
            f"{req.params.max_tokens}); lower max_tokens")
    return total


def _check_params(req: EngineRequest, worker) -> None:
    params, vocab = req.params, worker.cfg.vocab_size
    allowed = params.allowed_token_ids
    biased = [t for t, _ in params.logit_bias or ()]
    bad = [t for seq in params.bad_words_token_ids or () for t in seq]
    for name, ids in (("allowed_token_ids", allowed), ("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", biased), ("bad_words", bad)):
        check_token_ids(ids or (), vocab, name)
    ends = set(params.stop_token_ids) | (set() if params.ignore_eos
                                         else set(worker.eos_token_ids))
    if allowed and params.min_tokens and set(allowed) <= ends:
        raise RequestError("allowed_token_ids holds only end tokens, which min_tokens "
                           "forbids: nothing could be generated")


def _check_grammar(registry: ModelRegistry, req: EngineRequest, vocab: int) -> None:
    if req.params.reasoning is not None and max(req.params.reasoning[:2]) >= vocab:
        raise RequestError(f"reasoning marker ids must be below the vocabulary size {vocab}")
    if req.params.min_tokens:
        raise RequestError("min_tokens cannot be combined with response_format (the "
                           "grammar decides where the output ends)")
    if not registry.grammars.can_start(registry.compile_grammar(req), vocab):
        err = RequestError("response_format: no token of this model's vocabulary can "
                           "begin the required output")
        err.param = "response_format"
        raise err
