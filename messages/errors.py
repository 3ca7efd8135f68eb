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
