"""Preempted requests' KV swapped to host pages and back: token-exact, no leaks."""

import torch

from gpupool import SamplingParams
from gpupool.config import SchedulerConfig
from gpupool.engine.core import EngineCore
from gpupool.messages.types import EngineRequest
from gpupool.models.loaded import LoadedModel
from gpupool.pool.kv import KVStorage
from tests.factories import DeltaLog, engine_alone, hf_greedy, make_engine, random_prompts

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def _cut_at_eos(ids, eos=2):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _run(folder, num_host_pages):
    kv = KVStorage(12, 4096, "cpu")  # 8 tokens a page: far too few for 8 sequences
    kv.enable_host_swap(num_host_pages)
    core = EngineCore(SchedulerConfig(), kv.pages, kv)
    core.add_worker(LoadedModel("m", folder, torch.device("cpu"), kv, torch.float32))
    copies = {"out": 0, "in": 0}
    copy = kv.copy_pages

    def counting(pairs, to_host):
        copies["out" if to_host else "in"] += len(pairs)
        copy(pairs, to_host)

    kv.copy_pages = counting
    prompts = random_prompts(8, 10, 30, seed=4)
    seqs = []
    for i, ids in enumerate(prompts):
        core.enqueue(EngineRequest(str(i), "m", ids, GREEDY))
        seqs.append(core.requests[str(i)].seq)
    finals, log = {}, DeltaLog()
    while core.has_work():
        finals.update({int(o.request_id): log.tokens[o.request_id]
                       for o in log.add(core.step())})
        core.check_integrity()
    assert kv.pages.num_used_pages == 0 and kv.host_pages.num_used_pages == 0
    return prompts, finals, copies, sum(s.num_preemptions for s in seqs)


def test_swapped_kv_comes_back_token_exact(tiny_models):
    folder = tiny_models("llama")
    prompts, finals, copies, preemptions = _run(folder, num_host_pages=64)
    want = [_cut_at_eos(r) for r in hf_greedy(folder, prompts, 20)]
    assert preemptions > 0
    assert copies["out"] > 0 and copies["in"] == copies["out"]  # every page came back
    assert [_cut_at_eos(finals[i])[: len(want[i])] for i in range(8)] == want


def test_recompute_when_host_pages_run_out(tiny_models):
    folder = tiny_models("llama")
    prompts, finals, copies, preemptions = _run(folder, num_host_pages=1)
    want = [_cut_at_eos(r) for r in hf_greedy(folder, prompts, 20)]
    assert preemptions > 0 and copies["out"] <= copies["in"] + 1
    assert [_cut_at_eos(finals[i])[: len(want[i])] for i in range(8)] == want


def test_interleaved_models_with_kv_swaps_forced(tiny_models):
    variants = ("llama", "qwen3")
    prompts = {v: random_prompts(5, 10, 30, seed=i + 7) for i, v in enumerate(variants)}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want = {v: engine_alone(tiny_models(v), prompts[v], params) for v in variants}
    # 16 KiB pages: llama 32 tokens, qwen3 (head_dim 32) 16 tokens a page; 8 pages in all
    e = make_engine(kv_cache_bytes=8 * 16384, kv_page_bytes=16384, host_kv_bytes=64 * 16384)
    try:
        for v in variants:
            e.add_model(v, tiny_models(v))
        outs = e.generate([p for v in variants for p in prompts[v]], params,
                          model=[v for v in variants for _ in prompts[v]])
        assert [list(o.token_ids) for o in outs] == [t for v in variants for t in want[v]]
        e.check_integrity()
        assert e.local.kv.host_pages.num_used_pages == 0
        assert e.local.kv.num_pages_swapped_out > 0
        assert e.local.kv.num_pages_swapped_in == e.local.kv.num_pages_swapped_out
    finally:
        e.shutdown()
