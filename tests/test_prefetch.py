"""Weight prefetch: the next model's copy starts while the current one runs."""

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from gpupool import SamplingParams
from gpupool.messages.types import EngineRequest
from gpupool.models.config import ModelConfig
from gpupool.models.loader import build_layout
from gpupool.pool.arena import Arena
from gpupool.pool.residency import WeightPool
from gpupool.pool.weights import WeightLayout
from tests.factories import engine_alone, generate_interleaved, make_engine, random_prompts

VARIANTS = ("llama", "qwen2", "qwen3")


def _pool(weight_kib: int, host_kib: int = 100, device="cpu"):
    return WeightPool(Arena(weight_kib * 1024, 1024, device), host_kib * 1024)


def _add(pool, name, kib, value):
    layout = WeightLayout.build({"w": (kib * 256,)}, torch.float32)
    host = torch.full((kib * 256,), float(value)).view(torch.uint8)
    pool.register(name, layout, host, lambda: host.clone())


def test_prefetch_into_free_space_then_first_use_is_a_hit():
    pool = _pool(weight_kib=4)
    _add(pool, "a", 2, 1)
    _add(pool, "b", 2, 2)
    pool.make_resident("a")
    assert pool.prefetch("b", protect=frozenset({"a"}))
    assert not pool.prefetch("b")  # resident already
    assert pool.resident == ["b", "a"] and pool.num_prefetches == 1  # a stays the MRU
    swap = pool.make_resident("b", keep=frozenset({"b"}))
    assert swap.prefetched and swap.evicted == () and pool.prefetch_hits == 1
    assert torch.all(pool.views("b")["w"] == 2) and torch.all(pool.views("a")["w"] == 1)
    assert pool.make_resident("b") is None  # bound now: nothing more to wait for
    assert pool.num_swaps == 1  # only a's copy was waited for in full
    pool.check_integrity()
    pool.close()


def test_prefetch_evicts_the_lru_model_but_never_a_protected_one():
    pool = _pool(weight_kib=4)
    for name, value in (("a", 1), ("b", 2), ("c", 3)):
        _add(pool, name, 2, value)
    pool.make_resident("a")
    pool.make_resident("b")
    # c needs a slab: a is the least recently used, but it is the running model
    assert pool.prefetch("c", protect=frozenset({"a"}))
    assert sorted(pool.resident) == ["a", "c"]
    pool.make_resident("c")
    assert torch.all(pool.views("c")["w"] == 3)
    # both slabs are held by protected models: no prefetch, nothing evicted
    assert not pool.prefetch("b", protect=frozenset({"a", "c"}))
    assert sorted(pool.resident) == ["a", "c"]
    pool.check_integrity()
    pool.close()


def test_no_prefetch_of_a_model_whose_host_buffer_was_dropped():
    pool = _pool(weight_kib=4, host_kib=3)
    _add(pool, "a", 2, 1)
    _add(pool, "b", 2, 2)  # 4 KiB of host buffers > 3: a's is dropped
    assert pool.entries["a"].host is None
    assert not pool.prefetch("a") and pool.resident == []
    pool.close()


def _held_copy(pool):
    """Replace the copy engine by one whose copies finish only when released."""
    started, release = [], threading.Event()

    def start(dst, src):
        fut = Future()

        def finish():
            release.wait()
            dst.copy_(src)
            fut.set_result(None)

        threading.Thread(target=finish, daemon=True).start()
        started.append(fut)
        return fut

    pool._start_copy = start
    return started, release


def test_one_prefetch_at_a_time_and_a_slab_waits_for_its_copy():
    pool = _pool(weight_kib=6)
    for name, value in (("a", 1), ("b", 2), ("c", 3)):
        _add(pool, name, 2, value)
    pool.make_resident("a")
    started, release = _held_copy(pool)
    assert pool.prefetch("b", protect=frozenset({"a"}))
    assert not pool.prefetch("c", protect=frozenset({"a"}))  # b is still copying
    threading.Timer(0.2, release.set).start()
    pool.unregister("b")  # its slab may be reused only after its copy
    assert release.is_set() and started[0].done()  # it returned only after the copy
    assert pool.prefetch_wasted == 1 and pool.resident == ["a"]
    pool.check_integrity()
    assert pool.prefetch("c", protect=frozenset({"a"}))  # the copy engine is free again
    swap = pool.make_resident("c")
    assert swap.prefetched and torch.all(pool.views("c")["w"] == 3)
    pool.check_integrity()


def test_first_use_waits_for_the_rest_of_the_copy():
    pool = _pool(weight_kib=4)
    _add(pool, "a", 2, 1)
    _add(pool, "b", 2, 2)
    pool.make_resident("a")
    _, release = _held_copy(pool)
    pool.prefetch("b", protect=frozenset({"a"}))
    t0 = time.perf_counter()
    threading.Timer(0.2, release.set).start()
    t_call = time.perf_counter()
    swap = pool.make_resident("b")
    assert swap.prefetched and release.is_set()  # the step waited for the copy ...
    # ... and reports that wait: from its call until the release, at least 0.2 s after t0
    assert swap.seconds >= 0.2 - (t_call - t0) - 0.02
    assert torch.all(pool.views("b")["w"] == 2)


def test_a_failed_prefetch_copy_leaves_the_model_not_resident():
    pool = _pool(weight_kib=4)
    _add(pool, "a", 2, 1)
    _add(pool, "b", 2, 2)
    pool.make_resident("a")
    real_start = pool._start_copy

    def failing(dst, src):
        fut = Future()
        fut.set_exception(RuntimeError("copy engine fault"))
        return fut

    pool._start_copy = failing
    assert pool.prefetch("b", protect=frozenset({"a"}))
    with pytest.raises(RuntimeError, match="copy engine fault"):
        pool.make_resident("b", keep=frozenset({"b"}))
    assert pool.resident == ["a"]  # never bound to the half-written slab
    pool.check_integrity()
    pool._start_copy = real_start
    swap = pool.make_resident("b", keep=frozenset({"b"}))  # a full copy next time
    assert not swap.prefetched and torch.all(pool.views("b")["w"] == 2)
    pool._start_copy = failing  # a failed copy of a model that is then removed: no leak
    pool.make_resident("a")
    _add(pool, "c", 2, 3)
    assert pool.prefetch("c", protect=frozenset({"a"}))
    pool.unregister("c")
    assert sorted(pool.resident) == ["a"]
    pool.check_integrity()
    pool.close()


def _two_model_arena_engine(tiny_models, **kw):
    sizes = [build_layout(ModelConfig.from_folder(tiny_models(v)), torch.float32).num_bytes
             for v in VARIANTS]
    e = make_engine(weight_bytes=sum(sorted(sizes)[-2:]), **kw)  # any two of the three
    for v in VARIANTS:
        e.add_model(v, tiny_models(v))
    return e


def test_prefetched_models_give_the_same_tokens_as_each_model_alone(tiny_models):
    prompts = {v: random_prompts(3, 3, 30, seed=i + 3) for i, v in enumerate(VARIANTS)}
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = {v: engine_alone(tiny_models(v), prompts[v], params) for v in VARIANTS}
    for policy in ("token", "fcfs"):
        e = _two_model_arena_engine(tiny_models, policy=policy)
        try:
            per_model, mixed = generate_interleaved(e, prompts, params)
            assert per_model == want
            assert mixed == [t for v in VARIANTS for t in want[v]]
            assert e.local.weights.num_prefetches > 0, policy
            e.check_integrity()
        finally:
            e.shutdown()


def test_fcfs_prefetches_the_next_head_and_the_switch_waits_for_no_copy(tiny_models):
    e = _two_model_arena_engine(tiny_models, policy="fcfs")
    try:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        prompt = random_prompts(1, 5, 5)[0]
        order = ("qwen3", "llama", "qwen2")  # each prefetch finds a slab that fits
        with e.local._lock:  # drive the core by hand: one request each, in this order
            core = e.local.core
            for i, v in enumerate(order):
                core.enqueue(EngineRequest(str(i), v, prompt, params))
            while core.has_work():
                core.step()
                core.check_integrity()
        w = e.local.weights
        # qwen3 runs first; llama, then qwen2 (evicting qwen3) are copied while the model
        # before them runs
        assert w.num_prefetches == 2 and w.prefetch_hits == 2 and w.prefetch_wasted == 0
        assert w.num_swaps == 1  # qwen3's own first copy: the only one a step waited for
        assert sorted(w.resident) == ["llama", "qwen2"]
        stats = e.stats()["swaps"]
        assert stats["weight_prefetch_hits"] == 2
        e.check_integrity()
    finally:
        e.shutdown()


def test_prefetch_off_copies_only_when_a_step_needs_the_model(tiny_models):
    e = _two_model_arena_engine(tiny_models, policy="fcfs", prefetch=False)
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        e.generate(random_prompts(3, 5, 5), params, model=list(VARIANTS))
        assert e.local.weights.num_prefetches == 0 and e.local.weights.num_swaps >= 3
        e.check_integrity()
    finally:
        e.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (copy stream)")
def test_cuda_prefetch_on_the_copy_stream_overlaps_compute():
    mib = 64
    pool = _pool(weight_kib=2 * mib * 1024, host_kib=4 * mib * 1024, device="cuda")
    _add(pool, "a", mib * 1024, 1)
    _add(pool, "b", mib * 1024, 2)
    pool.make_resident("a")
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):  # compute queued on the default stream
        x = x @ x.T / 4096
    assert pool.prefetch("b", protect=frozenset({"a"}))
    swap = pool.make_resident("b")  # the compute stream waits on the copy's event
    assert swap.prefetched
    assert torch.all(pool.views("b")["w"] == 2).item()
    assert torch.all(pool.views("a")["w"] == 1).item()
    pool.check_integrity()


def test_a_prefetch_that_cannot_fit_evicts_nothing():
    pool = _pool(weight_kib=5)
    for name, kib, value in (("a", 2, 1), ("b", 2, 2), ("c", 3, 3)):
        _add(pool, name, kib, value)
    pool.make_resident("a")  # [0, 2) KiB
    pool.make_resident("b")  # [2, 4) KiB
    # c (3 KiB) fits only if a and b both go, and b is protected: nothing is evicted
    assert not pool.prefetch("c", protect=frozenset({"b"}))
    assert pool.resident == ["a", "b"] and pool.prefetch_wasted == 0
    pool.check_integrity()
