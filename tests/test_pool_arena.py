"""The arena, its slab allocator, the weight pool, and models swapped through one slot."""


import pytest
import torch

from gpupool import RequestError, SamplingParams
from gpupool.messages.types import EngineRequest
from gpupool.models.config import ModelConfig
from gpupool.models.loader import build_layout
from gpupool.pool.arena import ALIGN, Arena, SlabAllocator
from gpupool.pool.residency import PoolCapacityError, WeightPool
from gpupool.pool.weights import WeightLayout
from tests.factories import (
    DeltaLog,
    engine_alone,
    generate_interleaved,
    make_engine,
    random_prompts,
)


def test_slab_allocator_first_fit_and_coalescing():
    s = SlabAllocator(10 * ALIGN)
    a, b, c = s.allocate(3 * ALIGN), s.allocate(ALIGN + 1), s.allocate(3 * ALIGN)
    assert (a, b, c) == (0, 3 * ALIGN, 5 * ALIGN)  # ALIGN + 1 rounds up to two units
    assert s.allocate(3 * ALIGN) is None and s.num_free_bytes == 2 * ALIGN
    s.free(b)
    s.free(a)  # coalesces with b's range
    s.check_integrity()
    assert s.largest_free_bytes == 5 * ALIGN
    assert s.allocate(5 * ALIGN) == 0
    with pytest.raises(KeyError):
        s.free(ALIGN)  # not an allocation
    s.free(0)
    s.free(c)
    s.check_integrity()
    assert s.num_free_bytes == 10 * ALIGN and len(s._free) == 1


def _pool(weight_units: int, host_units: int = 100):
    arena = Arena(weight_units * 1024, 1024, "cpu")
    return WeightPool(arena, host_units * 1024)


def _entry(pool, name, units, value):
    layout = WeightLayout.build({"w": (units * 256,)}, torch.float32)  # units KiB
    loads = []

    def loader():
        loads.append(1)
        return torch.full((units * 256,), float(value)).view(torch.uint8)

    pool.register(name, layout, loader(), loader)
    return loads


def test_weight_pool_lru_eviction_and_views():
    pool = _pool(weight_units=5)
    for name, value in (("a", 1), ("b", 2), ("c", 3)):
        _entry(pool, name, 2, value)
    assert pool.make_resident("a").num_bytes == 2048
    assert pool.make_resident("b") is not None and pool.make_resident("a") is None
    swap = pool.make_resident("c")  # evicts the least recently used: b
    assert swap.evicted == ("b",) and pool.resident == ["a", "c"]
    assert torch.all(pool.views("c")["w"] == 3) and torch.all(pool.views("a")["w"] == 1)
    with pytest.raises(PoolCapacityError):
        pool.make_resident("b", keep=frozenset({"a", "c"}))
    pool.check_integrity()
    pool.unregister("a")
    pool.check_integrity()
    assert pool.arena.weight_slabs.num_free_bytes == 5 * 1024 - 2048


def test_a_model_larger_than_the_weight_region_is_refused():
    pool = _pool(weight_units=1)
    with pytest.raises(PoolCapacityError, match="weight region"):
        _entry(pool, "big", 2, 0)


def test_host_cache_bound_drops_and_rereads():
    pool = _pool(weight_units=2, host_units=3)
    loads_a = _entry(pool, "a", 2, 1)
    _entry(pool, "b", 2, 2)  # 4 KiB of host buffers > 3: a (not resident) is dropped
    assert pool.entries["a"].host is None and pool.entries["b"].host is not None
    pool.make_resident("a")  # re-read from "disk"
    assert len(loads_a) == 2 and torch.all(pool.views("a")["w"] == 1)
    pool.check_integrity()


VARIANTS = ("llama", "qwen2", "qwen3")


def _one_model_arena_engine(tiny_models, **kw):
    sizes = [build_layout(ModelConfig.from_folder(tiny_models(v)), torch.float32).num_bytes
             for v in VARIANTS]
    e = make_engine(weight_bytes=max(sizes), **kw)  # room for one model's weights at a time
    for v in VARIANTS:
        e.add_model(v, tiny_models(v))
    return e


def test_interleaved_models_through_a_one_model_arena(tiny_models):
    prompts = {v: random_prompts(4, 3, 30, seed=i) for i, v in enumerate(VARIANTS)}
    params = SamplingParams(max_tokens=12, temperature=0)
    want = {v: engine_alone(tiny_models(v), prompts[v], params) for v in VARIANTS}
    e = _one_model_arena_engine(tiny_models)
    try:
        per_model, mixed = generate_interleaved(e, prompts, params)
        assert per_model == want
        assert mixed == [t for v in VARIANTS for t in want[v]]
        assert e.local.weights.num_swaps >= len(VARIANTS) + 1  # models really were swapped
        assert len(e.local.weights.resident) == 1
        e.check_integrity()
    finally:
        e.shutdown()


def test_remove_model_with_requests_in_flight(tiny_models):
    e = _one_model_arena_engine(tiny_models)
    try:
        prompt = random_prompts(1, 5, 5)[0]
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        with e.local._lock:  # drive the core by hand for a deterministic interleaving
            core = e.local.core
            log = DeltaLog()
            core.enqueue(EngineRequest("x", "qwen2", prompt, params))
            core.enqueue(EngineRequest("y", "llama", prompt, params))
            for _ in range(3):
                log.add(core.step())
            core.remove_model("qwen2")
            with pytest.raises(RequestError, match="not loaded"):
                core.enqueue(EngineRequest("z", "qwen2", prompt, params))
            while core.has_work():
                log.add(core.step())
            assert log.final["x"].finish_reason == "length" and len(log.tokens["x"]) == 40
            assert "qwen2" not in core.workers and "qwen2" not in e.local.weights.entries
            core.check_integrity()
        assert e.models == ["llama", "qwen3"]
        with pytest.raises(RequestError):
            e.generate(prompt, params, model="qwen2")
        e.add_model("qwen2", tiny_models("qwen2"))  # and back again
        assert len(e.generate(prompt, SamplingParams(max_tokens=3), model="qwen2")) == 1
        e.check_integrity()
        assert e.local.kv.pages.num_used_pages == 0
    finally:
        e.shutdown()
