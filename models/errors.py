"""Errors raised while reading a model from disk."""


class ModelLoadError(ValueError):
    """A model folder cannot be served: unsupported, missing or corrupt. Names the file."""
