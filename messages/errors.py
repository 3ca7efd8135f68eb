"""The errors that cross the engine boundary. An engine reports a failure by class and message
(a remote client raises the same class again), so every layer catches these and no other."""

from __future__ import annotations


class EngineError(ValueError):
    """Base of everything the engine refuses; ``kind`` names the class on the wire."""

    kind = "engine_error"


class RequestError(EngineError):
    """A request that cannot be served as asked (bad prompt, unknown model, ...)."""

    kind = "request_error"


class ModelLoadError(EngineError):
    """A model folder cannot be served: unsupported, missing or corrupt. Names the file."""

    kind = "model_load_error"


class AdapterError(EngineError):
    """An adapter that cannot be served (unsupported, malformed, wrong base, unknown name)."""

    kind = "adapter_error"


ERRORS = {cls.kind: cls for cls in (EngineError, RequestError, ModelLoadError, AdapterError)}


def error_from(kind: str, message: str) -> EngineError:
    """The exception a peer reported as (``kind``, ``message``)."""
    return ERRORS.get(kind, EngineError)(message)


def _named(values) -> str:
    """Offending values for an error message: each once, in order, at most 8 shown."""
    shown = list(dict.fromkeys(repr(v) for v in values))
    more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
    return ", ".join(shown[:8]) + more


def check_token_ids(ids, vocab: int, what: str = "prompt") -> None:
    """RequestError naming the entries of ``ids`` that are not token ids of a vocabulary of
    ``vocab`` (integers in [0, vocab))."""
    wrong = [t for t in ids
             if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if wrong:
        raise RequestError(f"{what} token ids must be integers in [0, {vocab}); got "
                           f"{_named(wrong)}")
