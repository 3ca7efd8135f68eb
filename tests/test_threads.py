"""Torch threads: the step loop runs on the engine's thread count, helper threads (admin
commands, prefetch copies) on one, so the process has one OpenMP team (LocalEngine._loop)."""

from __future__ import annotations

import asyncio

import torch

from gpupool import SamplingParams
from gpupool.engine.local import LocalClient, one_thread
from gpupool.messages.types import AddModel
from tests.factories import make_engine


def test_the_step_loop_uses_the_engine_s_threads_and_helpers_one(tiny_models, monkeypatch):
    seen = {}
    engine = make_engine(tiny_models("llama"), threads=3)
    try:
        worker = engine.local.core.workers["m"]
        execute = worker.execute

        def recording(rows):
            seen["loop"] = torch.get_num_threads()
            return execute(rows)

        worker.execute = recording
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        assert engine.local.threads == 3 and seen["loop"] == 3

        from gpupool.engine import local

        real = local.LoadedModel

        def spy(*args, **kwargs):
            seen["command"] = torch.get_num_threads()
            return real(*args, **kwargs)

        monkeypatch.setattr(local, "LoadedModel", spy)
        asyncio.run(LocalClient(engine).command(AddModel("n", str(tiny_models("llama")))))
        assert seen["command"] == 1
    finally:
        engine.shutdown()
    before = torch.get_num_threads()
    assert one_thread(torch.get_num_threads)() == 1  # here, in this thread, for the test
    torch.set_num_threads(before)
