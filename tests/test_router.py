"""The cluster's routing policy, without Redis: resident first, then host-cached, then the
least loaded worker that can hold the model; overload spills to a second worker."""

import pytest

from gpupool.scheduler.router import NoWorker, Router, WorkerView


def _w(name, **kw):
    return WorkerView(name, **kw)


def test_resident_then_cached_then_least_loaded():
    r = Router(spread=100)
    ws = [_w("a", running=5), _w("b", cached=frozenset({"m"}), running=9),
          _w("c", resident=frozenset({"m"}), running=20)]
    first = r.route("m", ws)
    assert (first.worker, first.reason) == ("c", "resident")
    ws[2].alive = False  # the resident one died: the host cache is next
    assert r.route("m", ws).worker == "b" and r.route("m", ws).reason == "cached"
    ws[1].draining = True  # draining takes no new work: the least loaded then
    assert r.route("m", ws).worker == "a" and r.route("m", ws).reason == "load"


def test_a_burst_between_heartbeats_is_spread_and_overload_spills():
    r = Router(max_queue=2)
    ws = [_w("a", resident=frozenset({"m"})), _w("b"), _w("c")]
    picks = [r.route("m", ws).worker for _ in range(6)]
    assert picks[:2] == ["a", "a"]  # the resident worker until its queue is full
    assert set(picks[2:]) == {"b", "c"}  # then the load spreads over the others
    assert ws[1].sent + ws[2].sent == 4 and abs(ws[1].sent - ws[2].sent) <= 1


def test_exclude_and_no_worker():
    r = Router()
    ws = [_w("a", resident=frozenset({"m"})), _w("b")]
    assert r.route("m", ws, exclude=frozenset({"a"})).worker == "b"
    with pytest.raises(NoWorker, match="no live worker"):
        r.route("m", ws, exclude=frozenset({"a", "b"}))


def test_a_model_larger_than_every_weight_region_is_refused():
    r = Router()
    gib = 2**30
    ws = [_w("a", weight_bytes=1 * gib, element_bytes=4),
          _w("b", weight_bytes=3 * gib, element_bytes=2)]
    assert r.route("m", ws, model_params=gib).worker == "b"  # 4 GiB on a, 2 GiB on b
    with pytest.raises(NoWorker, match=r"about 4\.00 GiB .*\(largest 3\.00 GiB, on b"):
        r.route("m", ws, model_params=2 * gib)
    assert r.route("m", [_w("c")], model_params=2 * gib).worker == "c"  # sizes unknown


def test_a_worker_holding_the_adapter_is_preferred_then_load_spreads():
    """Among workers with the base resident: the one with the adapter in a device slot, then
    one that read it into its host cache, then the least loaded; a full queue spills."""
    r = Router(max_queue=2, spread=100)
    m = frozenset({"m"})
    ws = [_w("a", resident=m, running=1), _w("b", resident=m, running=5,
                                              host_adapters=frozenset({"x"})),
          _w("c", resident=m, running=9, adapters=frozenset({"x"}))]
    first = r.route("m", ws, adapter="x")
    assert (first.worker, first.reason) == ("c", "adapter")
    assert r.route("m", ws, adapter="x").worker == "c"  # c's queue now full (2 sent)
    spill = r.route("m", ws, adapter="x")
    assert (spill.worker, spill.reason) == ("b", "adapter-cached")
    plain = r.route("m", ws, adapter="y")  # an adapter no worker holds: the base's tiers
    assert (plain.worker, plain.reason) == ("a", "resident")
    assert r.route("m", ws).reason == "resident"  # the base model itself


def test_load_spreads_before_a_queue_builds():
    """A worker whose load is ``spread`` above the least loaded one's is passed over in
    every tier: the adapter's holder, then a worker with the base resident, then one that
    must load the base (no queue needed; max_queue is never reached here)."""
    r = Router(max_queue=100, spread=4)
    m, x = frozenset({"m"}), frozenset({"x"})
    ws = [_w("a", resident=m, running=10, adapters=x), _w("b", resident=m, running=7),
          _w("c", running=5)]
    first = r.route("m", ws, adapter="x")  # a's load 10, the least 5: 5 above, passed over
    assert (first.worker, first.reason) == ("b", "resident")
    assert r.route("m", ws, adapter="x").worker == "b"  # b at 8: 3 above c's 5
    third = r.route("m", ws, adapter="x")  # b at 9, 4 above: only c, which loads m
    assert (third.worker, third.reason) == ("c", "load")
    picks = [r.route("m", ws).worker for _ in range(12)]
    loads = [w.load for w in ws]
    assert max(loads) - min(loads) <= 4 and set(picks) == {"a", "b", "c"}
    far = Router(max_queue=100, spread=100)  # no spreading: the holder every time
    assert {far.route("m", ws, adapter="x").worker for _ in range(8)} == {"a"}


def test_a_gateways_stream_keeps_every_field_of_a_workers_delta():
    """The gateway's copy of a worker's delta drops only the tokens it already delivered:
    an embedding, cached tokens and prompt logprobs come through (an embedding request
    behind a gateway was a 500 when they were dropped)."""
    from collections import deque

    from gpupool.cluster.client import _RemoteStream
    from gpupool.messages.types import OutputDelta, Usage

    stream = _RemoteStream.__new__(_RemoteStream)  # no Redis: only what _accept reads
    stream.request_id, stream.tokens, stream.finished, stream.pending = "r", [], False, deque()
    stream._accept(OutputDelta("r", 0, finish_reason="stop", usage=Usage(2, 0, 1),
                               cached_tokens=1, embedding=(0.5, -1.0),
                               prompt_logprobs=(None,)))
    (out,) = stream.pending
    assert out.embedding == (0.5, -1.0) and out.cached_tokens == 1
    assert out.prompt_logprobs == (None,) and out.finished and out.usage == Usage(2, 0, 1)


def test_a_model_too_large_for_one_rank_goes_to_a_tensor_parallel_group():
    """Each rank of a tensor-parallel worker holds a shard: a model larger than a one-rank
    worker's weight region goes to a group whose ranks' regions hold its shards; a request
    moved from a dead worker goes only to a worker of its degree (or fails, named)."""
    r = Router()
    one = WorkerView("one", weight_bytes=1000, element_bytes=2)
    group = WorkerView("tp2", weight_bytes=1000, element_bytes=2, tensor_parallel=2)
    assert r.route("big", [one, group], model_params=800).worker == "tp2"  # 1600 B: 800 a rank
    assert r.route("small", [one, group], model_params=100, degree=1).worker == "one"
    assert r.route("small", [one, group], model_params=100, degree=2).worker == "tp2"
    with pytest.raises(NoWorker, match="2 tensor-parallel rank"):
        r.route("big", [one, group], model_params=800, exclude=frozenset({"tp2"}), degree=2)
    with pytest.raises(NoWorker, match="--tensor-parallel"):
        r.route("huge", [one, group], model_params=1200)


def test_a_model_no_group_can_shard_goes_to_a_one_rank_worker_or_is_refused():
    r = Router()
    one = WorkerView("one", weight_bytes=1000, element_bytes=2)
    group = WorkerView("tp2", weight_bytes=1000, element_bytes=2, tensor_parallel=2)

    def refusal(degree):  # 9 heads (SmolLM2): 2 ranks cannot split them
        return None if degree == 1 else "9 attention heads are not"

    for _ in range(3):
        assert r.route("m", [one, group], model_params=100, refusal=refusal).worker == "one"
    with pytest.raises(NoWorker, match="9 attention heads"):
        r.route("m", [group], model_params=100, refusal=refusal)
