"""Errors raised while reading a model from disk (defined with the engine's messages)."""

from gpupool.messages.errors import ModelLoadError

__all__ = ["ModelLoadError"]
