"""gpupool: serve many fine-tuned LLMs from one shared pool of accelerators.

The names below are imported when first used (PEP 562), so ``import gpupool.kernels`` or
``import gpupool.scheduler`` loads only that package, never the whole engine.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterConfig": "gpupool.adapters.base",
    "AdapterError": "gpupool.messages.errors",
    "Config": "gpupool.config",
    "Engine": "gpupool.llm",
    "ModelLoadError": "gpupool.messages.errors",
    "PoolConfig": "gpupool.config",
    "RequestError": "gpupool.messages.errors",
    "RequestOutput": "gpupool.frontend.text",
    "SLO": "gpupool.scheduler.slo",
    "SamplingParams": "gpupool.messages.params",
    "SchedulerConfig": "gpupool.scheduler.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpupool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
