"""Shared fixtures. Tests run on CPU; Triton kernels run under its interpreter there."""

import os

# Every Python the tests start (the server, workers, ``python -c`` checks, many with the
# checkout as their working directory) runs without its working directory on sys.path: the
# checkout's top-level folders (kernels, api, models, ...) would answer for PyPI packages of
# the same names that dependencies probe for (transformers imports Hugging Face's ``kernels``).
os.environ["PYTHONSAFEPATH"] = "1"

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is evaluated

import pytest  # noqa: E402

from tests.factories import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder of a tiny random model per architecture variant, made once per session."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = make_tiny_model(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory):
    """The real default model, converted once into the user's data dir (reused across runs)."""
    from gpupool.config import default_home
    from gpupool.default_model import ensure_default_model

    return ensure_default_model(default_home())
