"""Prefix caching (issue 17): the page index and its states, sharing within one namespace
(model, adapter, salt) and never across, token identity with the cache off, and no page or
index entry left behind by aborts, preemption, swaps and removals."""

from __future__ import annotations

import pytest

from gpupool import SamplingParams
from gpupool.pool.pages import PagePool, page_key, prefix_root
from tests.factories import make_engine, make_peft_adapter, random_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PAGE = 2048  # bytes: 4 tokens of the tiny fp32 models per page


# ---- the page pool ---------------------------------------------------------------------------
def test_keys_chain_and_namespaces_differ():
    root = prefix_root("m", None, None)
    assert page_key(root, [1, 2, 3]) == page_key(prefix_root("m", None, None), [1, 2, 3])
    assert page_key(root, [1, 2, 3]) != page_key(root, [1, 2, 4])
    others = [prefix_root("m", "a", None), prefix_root("n", None, None),
              prefix_root("m", None, "tenant:x")]
    assert len({root, *others}) == 4
    k1 = page_key(root, [1, 2])
    assert page_key(k1, [3, 4]) != page_key(page_key(root, [9, 9]), [3, 4])  # parent counts


def test_cached_pages_are_free_memory_evicted_lru():
    pool = PagePool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"ka", "m", None)
    pool.register(b, b"kb", "m", None)
    pool.free([a])
    pool.free([b])  # both cached; a is the least recently used
    pool.check_integrity({})
    assert pool.num_used_pages == 0 and pool.num_free_pages == 4 and pool.num_cached_pages == 2
    assert pool.lookup([b"ka", b"kb"]) == [a, b] and pool.lookup([b"kb"]) == [b]
    c, d = pool.allocate(2)  # the free list first: nothing evicted
    assert {c, d}.isdisjoint({a, b}) and pool.num_cached_pages == 2
    (e,) = pool.allocate(1)  # then the LRU cached page
    assert e == a and pool.lookup([b"ka"]) == [] and pool.num_evicted == 1
    pool.share([b])  # a hit: b is held, no longer evictable
    assert pool.allocate(1) is None
    pool.check_integrity({c: 1, d: 1, e: 1, b: 1})


def test_shared_pages_count_holders_and_register_refuses_duplicates():
    pool = PagePool(3)
    (p,) = pool.allocate(1)
    assert pool.register(p, b"k", "m", None)
    pool.share([p])
    pool.share([p])
    (q,) = pool.allocate(1)
    assert not pool.register(q, b"k", "m", None)  # computed twice: this copy stays private
    pool.check_integrity({p: 3, q: 1})
    pool.free([p, p])
    pool.free([q])
    assert pool.num_used_pages == 1 and pool.num_free_pages == 2
    pool.free([p])
    assert pool.num_free_pages == 3 and pool.num_cached_pages == 1
    with pytest.raises(ValueError):
        pool.free([p])
    with pytest.raises(ValueError):
        pool.share([q])  # never indexed
    pool.check_integrity({})


def test_drop_forgets_a_model_or_an_adapter():
    pool = PagePool(6)
    pages = pool.allocate(4)
    for p, (model, adapter) in zip(pages, [("m", None), ("m", "a"), ("m", "b"), ("n", None)]):
        pool.register(p, f"{model}{adapter}".encode(), model, adapter)
    pool.free(pages[1:])
    assert pool.drop("m", adapter="a") == 1 and pool.num_cached_pages == 3
    assert pool.drop("m", everything=True) == 2  # m's base entry (held) and adapter b's
    assert pool.is_indexed(pages[3]) and not pool.is_indexed(pages[0])
    pool.check_integrity({pages[0]: 1})
    assert pool.evict_all() == 1
    pool.free(pages[:1])
    assert pool.num_free_pages == 6 and pool.num_used_pages == 0 and pool.num_cached_pages == 0
    pool.check_integrity({})


# ---- the engine ------------------------------------------------------------------------------
def _record_rows(engine, model="m"):
    """Wrap the model's execute: every step's rows (token count, pages) land in the list."""
    worker = engine.local.core.workers[model]
    rows, execute = [], worker.execute

    def recording(batch):
        rows.append([(len(r.token_ids), list(r.pages), r.adapter) for r in batch])
        return execute(batch)

    worker.execute = recording
    return rows


def _shared_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, prefix_len, seed=seed)[0]
    tails = random_prompts(n, 3, 9, seed=seed + 1)
    return [prefix + t for t in tails]


def test_same_prompt_shares_full_pages_and_computes_only_the_rest(tiny_models):
    engine = make_engine(tiny_models("llama"), kv_page_bytes=PAGE)
    try:
        bt = engine.local.core.workers["m"].block_tokens
        prompt = random_prompts(1, 22, 22, seed=3)[0]  # 5 full pages of 4 and 2 tokens
        rows = _record_rows(engine)
        first = engine.generate([prompt], GREEDY)[0]
        prefill_rows = len(rows)
        second = engine.generate([prompt], GREEDY)[0]
        assert first.token_ids == second.token_ids
        assert first.cached_tokens == 0 and second.cached_tokens == 5 * bt
        (n1, pages1, _), (n2, pages2, _) = rows[0][0], rows[prefill_rows][0]
        assert n1 == 22 and n2 == 22 - 5 * bt  # the second computed only the uncached tokens
        assert pages2[:5] == pages1[:5]  # the same page ids for the shared prefix
        stats = engine.stats()
        assert stats["models"]["m"]["prefix_cache_hits"] == 5 * bt
        assert stats["models"]["m"]["prefix_cache_queries"] == 44
        engine.local.core.check_integrity()
    finally:
        engine.shutdown()


def test_a_prompt_of_whole_pages_still_computes_its_last_token(tiny_models):
    engine = make_engine(tiny_models("llama"), kv_page_bytes=PAGE)
    try:
        prompt = random_prompts(1, 16, 16, seed=4)[0]  # exactly 4 pages
        rows = _record_rows(engine)
        a = engine.generate([prompt], GREEDY)[0]
        n = len(rows)
        b = engine.generate([prompt], GREEDY)[0]
        assert a.token_ids == b.token_ids
        assert b.cached_tokens == 12 and rows[n][0][0] == 4  # 3 pages hit, 1 page recomputed
    finally:
        engine.shutdown()


def test_adapters_and_salts_share_nothing(tiny_models, tmp_path):
    folder = tiny_models("llama")
    ad = {k: make_peft_adapter(folder, tmp_path / k, 4, ["q_proj", "v_proj"], seed=i)
          for i, k in enumerate(("a", "b"))}
    engine = make_engine(folder, kv_page_bytes=PAGE)
    try:
        for k, path in ad.items():
            engine.add_adapter(k, "m", path)
        prompt = random_prompts(1, 20, 20, seed=5)[0]
        rows = _record_rows(engine)
        outs = {name: engine.generate([prompt], GREEDY, model=name)[0]
                for name in ("a", "b", "m")}
        assert all(o.cached_tokens == 0 for o in outs.values())  # three namespaces
        pages = [set(step[0][1]) for step in rows if step[0][0] == 20]
        assert len(pages) == 3 and not (pages[0] & pages[1]) and not (pages[1] & pages[2])
        again = engine.generate([prompt], GREEDY, model="a")[0]
        assert again.cached_tokens == 16 and again.token_ids == outs["a"].token_ids
        salted = engine.generate([prompt], GREEDY, model="a", cache_salt="tenant:x")[0]
        assert salted.cached_tokens == 0 and salted.token_ids == outs["a"].token_ids
        assert engine.generate([prompt], GREEDY, model="a",
                               cache_salt="tenant:x")[0].cached_tokens == 16
        engine.local.core.check_integrity()
    finally:
        engine.shutdown()


def _run_workload(folder, caching: bool, tmp_path=None, **engine_opts):
    """Shared-prefix prompts over the base and two adapters, in two waves (the second hits
    the first's cache), and a chunked long prompt; every output's tokens."""
    engine = make_engine(folder, kv_page_bytes=PAGE, enable_prefix_caching=caching,
                         **engine_opts)
    try:
        if tmp_path is not None:
            for i, k in enumerate(("a", "b")):
                engine.add_adapter(k, "m", make_peft_adapter(
                    folder, tmp_path / f"{k}{caching}", 4, ["q_proj", "o_proj"], seed=i))
        names = ["m", "a", "b"] if tmp_path is not None else ["m"]
        prompts = _shared_prompts(9, 13, seed=7)
        models = [names[i % len(names)] for i in range(len(prompts))]
        out = [list(o.token_ids) for o in engine.generate(prompts[:4], GREEDY, model=models[:4])]
        out += [list(o.token_ids) for o in engine.generate(prompts, GREEDY, model=models)]
        long = prompts[0] + random_prompts(1, 40, 40, seed=8)[0]
        out += [list(o.token_ids) for o in engine.generate([long, long], GREEDY)]
        cached = engine.stats()["models"]["m"]["prefix_cache_hits"]
        engine.local.core.check_integrity()
        return out, cached, engine.local.core.scheduler.num_preemptions
    finally:
        engine.shutdown()


def test_greedy_tokens_identical_with_the_cache_on_and_off(tiny_models, tmp_path):
    folder = tiny_models("llama")
    on, hits, _ = _run_workload(folder, True, tmp_path, max_num_batched_tokens=16)
    off, none, _ = _run_workload(folder, False, tmp_path, max_num_batched_tokens=16)
    assert on == off
    assert hits > 0 and none == 0


def test_identical_under_preemption_and_swap(tiny_models):
    """A KV pool too small for the batch: sequences are preempted (swapped to host pages, or
    recomputed) and cached pages evicted; the tokens stay those of the cache-less run."""
    folder = tiny_models("llama")
    for host in (1 << 20, 0):  # swap to host pages; recompute
        on, hits, preempted = _run_workload(folder, True, kv_cache_bytes=20 * PAGE,
                                            host_kv_bytes=host)
        off, _, _ = _run_workload(folder, False, kv_cache_bytes=20 * PAGE, host_kv_bytes=host)
        assert on == off
        assert preempted > 0 and hits > 0


def test_interleaved_models_keep_their_own_caches(tiny_models):
    engine = make_engine(kv_page_bytes=PAGE)
    try:
        engine.add_model("x", tiny_models("llama"))
        engine.add_model("y", tiny_models("qwen2"))
        prompt = random_prompts(1, 18, 18, seed=9)[0]
        first = engine.generate([prompt, prompt], GREEDY, model=["x", "y"])
        again = engine.generate([prompt, prompt], GREEDY, model=["y", "x"])
        assert [o.token_ids for o in again] == [first[1].token_ids, first[0].token_ids]
        assert [o.cached_tokens for o in first] == [0, 0]
        assert all(o.cached_tokens > 0 for o in again)
        engine.remove_model("y")
        assert all(e.model == "x" for e in engine.local.kv.pages.entries())  # y's cache is gone
        engine.local.core.check_integrity()
    finally:
        engine.shutdown()


def test_removing_an_adapter_drops_its_cache_and_aborts_leave_nothing(tiny_models, tmp_path):
    folder = tiny_models("llama")
    engine = make_engine(folder, kv_page_bytes=PAGE)
    try:
        engine.add_adapter("a", "m", make_peft_adapter(folder, tmp_path / "a", 4, ["q_proj"]))
        prompt = random_prompts(1, 20, 20, seed=10)[0]
        engine.generate([prompt], GREEDY, model="a")
        engine.generate([prompt], GREEDY, model="m")
        assert {e.adapter for e in engine.local.kv.pages.entries()} == {"a", None}
        engine.remove_adapter("a")
        assert {e.adapter for e in engine.local.kv.pages.entries()} == {None}
        # a re-added adapter of the same name is other weights: no stale hit
        engine.add_adapter("a", "m", make_peft_adapter(folder, tmp_path / "a2", 4, ["q_proj"],
                                                       seed=3))
        assert engine.generate([prompt], GREEDY, model="a")[0].cached_tokens == 0
        long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        rid = engine.add_request(prompt, long, model="m")
        engine.abort(rid)
        engine.local.core.check_integrity()
        assert engine.reset_prefix_cache() > 0
        assert engine.local.kv.pages.num_used_pages == 0
        assert engine.local.kv.pages.num_free_pages == engine.local.kv.pages.num_pages
    finally:
        engine.shutdown()
