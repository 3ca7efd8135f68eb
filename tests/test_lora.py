"""Multi-LoRA against peft: mixed batches of base and adapter rows, removal, and the
adapters' device copies in pages of the KV pool (adapters/paged.py)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpupool import AdapterError, RequestError, SamplingParams
from gpupool.adapters.paged import AdapterPages, RawCopy, pack_adapter, pack_raw
from gpupool.adapters.peft_format import read_raw
from gpupool.engine.core import batch_rows
from gpupool.kernels import native
from gpupool.messages.types import EngineRequest
from gpupool.models.config import ModelConfig
from gpupool.pool.pages import PagePool
from tests.factories import (
    DeltaLog,
    make_engine,
    make_peft_adapter,
    peft_greedy,
    random_prompts,
)

ADAPTERS = {  # name: (rank, target modules, rslora)
    "r4": (4, ["q_proj", "v_proj"], False),
    "r8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
    "r16": (16, ["gate_proj", "up_proj", "down_proj"], False),
    "r64": (64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                 "down_proj"], False),
}


@pytest.fixture(scope="module")
def lora_setup(tiny_models, tmp_path_factory):
    base = tiny_models("llama")
    root = tmp_path_factory.mktemp("adapters")
    paths = {n: make_peft_adapter(base, root / n, r, t, rslora=rs, seed=i)
             for i, (n, (r, t, rs)) in enumerate(ADAPTERS.items())}
    return base, paths


def _engine(base, paths, **kw):
    e = make_engine(base, name="base", max_lora_rank=64, **kw)
    for name, path in paths.items():
        e.add_adapter(name, "base", path)
    return e


@pytest.fixture(scope="module")
def mixed(lora_setup):
    base, paths = lora_setup
    names = [None, "r4", "r8", "r16", "r64", None, "r64", "r4", "r16", "r8"]
    prompts = random_prompts(len(names), 3, 30, seed=21)
    want = peft_greedy(base, paths, prompts, names, 16)
    return names, prompts, want


def test_mixed_batch_matches_peft(lora_setup, mixed):
    base, paths = lora_setup
    names, prompts, want = mixed
    # every adapter changes the output vs the base model (the test can fail)
    base_out = peft_greedy(base, paths, prompts, [None] * len(prompts), 16)
    assert sum(w != b for w, b, n in zip(want, base_out, names) if n) >= 6
    e = _engine(base, paths)
    try:
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        assert [o.model for o in outs] == [n or "base" for n in names]
        e.check_integrity()
    finally:
        e.shutdown()


def test_a_mixed_batch_on_the_triton_backend_matches_peft(lora_setup, mixed):
    """Triton's LoRA kernels reading the adapters' pages in place (kernels.sgmv.lora_paged;
    interpreted on CPU) in an engine: peft's greedy tokens."""
    base, paths = lora_setup
    names, prompts, want = mixed
    pick = [0, 2, 3]  # base, r8 (q k v o), r16 (the MLP)
    e = _engine(base, paths, kernels="triton")
    try:
        assert e.local.core.workers["base"].model.ops.paged_lora
        outs = e.generate([prompts[i] for i in pick],
                          SamplingParams(max_tokens=3, temperature=0),
                          model=[names[i] or "base" for i in pick])
        assert [list(o.token_ids) for o in outs] == [want[i][:3] for i in pick]
        e.check_integrity()
    finally:
        e.shutdown()


def test_logits_match_peft_within_tolerance(lora_setup):
    """Prefill logits of every row of a mixed batch vs peft's forward, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, paths = lora_setup
    names = [None, "r4", "r8", "r16", "r64"]
    prompts = random_prompts(len(names), 5, 20, seed=22)
    e = _engine(base, paths)
    try:
        core = e.local.core
        for i, (ids, n) in enumerate(zip(prompts, names)):
            core.enqueue(EngineRequest(str(i), n or "base", ids, SamplingParams(max_tokens=1)))
        out = core.scheduler.schedule()
        core.workers["base"].make_resident()
        logits = core.workers["base"].execute(batch_rows(out))
        ours = {s.seq.request_id: logits[k] for k, s in enumerate(out.scheduled)}
        for s in out.scheduled:
            core.abort(s.seq.request_id)
    finally:
        e.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(paths["r4"]), adapter_name="r4")
    for n in ("r8", "r16", "r64"):
        model.load_adapter(str(paths[n]), adapter_name=n)
    worst = 0.0
    for i, (ids, n) in enumerate(zip(prompts, names)):
        with torch.no_grad():
            ref = model(torch.tensor([ids]), adapter_names=[n or "__base__"]).logits[0, -1]
        worst = max(worst, ((ours[str(i)] - ref).abs().max() / ref.abs().max()).item())
    assert worst < 1e-4, f"max relative logit error {worst}"


def test_more_adapters_than_the_cap(lora_setup, mixed):
    base, paths = lora_setup
    names, prompts, want = mixed
    e = _engine(base, paths, max_loras_on_device=2)
    try:
        slots = e.local.core.workers["base"].adapter_pages
        per_step, ensure = [], slots.ensure
        slots.ensure = lambda names, *a: per_step.append(set(names)) or ensure(names, *a)
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        assert max(len(s) for s in per_step) == 2  # never more adapters than the cap
        assert set().union(*per_step) == set(ADAPTERS)
        assert slots.num_loads >= len(ADAPTERS) and len(slots.resident) <= 2
        e.check_integrity()
    finally:
        e.shutdown()


def test_requests_whose_adapter_is_on_the_device_go_first(lora_setup, mixed):
    """A cap of one holding r4; a request for r8 queued before two for r4: the r4 requests run
    first (one load, r8's) unless the preference is off (adapter_wait_ms=0: r8 first, then r4
    loaded again). Outputs match peft either way."""
    base, paths = lora_setup
    names, prompts, want = mixed
    i4, i8 = names.index("r4"), names.index("r8")
    for wait_ms, loads in ((500.0, 2), (0.0, 3)):
        e = _engine(base, paths, max_loras_on_device=1, adapter_wait_ms=wait_ms)
        try:
            slots = e.local.core.workers["base"].adapter_pages
            params = SamplingParams(max_tokens=16, temperature=0)
            assert list(e.generate([prompts[i4]], params, model="r4")[0].token_ids) == want[i4]
            outs = e.generate([prompts[i8], prompts[i4], prompts[i4]], params,
                              model=["r8", "r4", "r4"])
            assert [list(o.token_ids) for o in outs] == [want[i8], want[i4], want[i4]]
            assert slots.num_loads == loads, wait_ms
            e.check_integrity()
        finally:
            e.shutdown()


def test_files_of_one_layout_share_its_parse_and_keep_their_own_values(tmp_path):
    """read_raw parses a header once for every file that has it byte for byte (adapters of
    one recipe), each file's values its own; another header (other shapes, several dtypes,
    a gap between tensors) is parsed for itself, and the files it cannot view plainly give
    None, also when asked again."""
    def write(name, tensors):
        save_file(tensors, str(tmp_path / name))
        return tmp_path / name

    def ab(seed, dtype=torch.float16, rows=4):
        g = torch.Generator().manual_seed(seed)
        return {"x.lora_A.weight": torch.randn(rows, 8, generator=g).to(dtype),
                "x.lora_B.weight": torch.randn(8, rows, generator=g).to(dtype)}

    first, second = ab(1), ab(2)
    a = read_raw(write("a.safetensors", first))
    b = read_raw(write("b.safetensors", second))
    other = read_raw(write("c.safetensors", ab(3, rows=2)))
    assert a.signature is b.signature and a.shapes is b.shapes  # one parse of the header
    assert other.signature != a.signature and other.shapes["x.lora_A.weight"] == (2, 8)
    for raw, want in ((a, first), (b, second)):
        for key, t in want.items():
            start = raw.starts[key]
            assert torch.equal(raw.values[start : start + t.numel()].view(t.shape), t), key
    mixed = {**ab(4), "y.lora_A.weight": torch.ones(2, 2)}  # float16 and float32
    bad = write("mixed.safetensors", mixed)
    raw = bytearray((tmp_path / "a.safetensors").read_bytes())  # a gap: B's offsets moved
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode()
    begin, end = (int(x) for x in header.split('"data_offsets":[')[2].split("]")[0].split(","))
    moved = header.replace(f"[{begin},{end}]", f"[{begin + 2},{end + 2}]")
    assert len(moved) == len(header) and moved != header
    gap = tmp_path / "gap.safetensors"
    gap.write_bytes(raw[:8] + moved.encode() + raw[8 + n :] + b"\0\0")
    for _ in range(2):
        assert read_raw(bad) is None and read_raw(gap) is None
        assert read_raw(tmp_path / "a.safetensors").signature is a.signature


def _packs_as_the_reference(engine, names) -> None:
    """Each adapter's host copy packed from its file's bytes by a plan (torch's gather and
    scatter, the native pass over the plan's runs, a RawCopy packed) equals the reference
    packing bit for bit (its bf16 part included), and its device copy in the pages (over
    stale bytes) is the reference's, piece for piece in page-table order."""
    worker = engine.local.core.workers[next(iter(engine.local.core.workers))]
    paged = worker.adapter_pages
    lay = paged.layout
    native.available()  # (the engine has run no step: built and loaded here)
    for name in names:
        paged._drop_host(name)
        # read from its file now: where the pages are host memory, the file's values
        copy = paged.load_host(name)
        assert isinstance(copy, RawCopy) == (paged.raw_copies and native.loaded()), name
        fast = paged.packed(name)
        spec = paged.loaders[name].spec
        raw = read_raw(spec.path)
        plan = paged._plans[raw.signature, paged.ranks[name]]
        assert plan.masks == spec.layers  # so _pack took the plan, not the fallback
        ref = pack_adapter(lay, paged.cfg, paged.ranks[name], paged.loaders[name])
        assert torch.equal(fast, ref), name
        ways = (False, True) if native.available() and lay.dtype == torch.float32 else (False,)
        for way in ways:  # torch's gather and scatter, the native pass over runs
            direct = pack_raw(lay, paged.cfg, paged.ranks[name], plan, raw, spec.scaling,
                              use_native=way)
            assert direct is not None  # the plan's path, not the fallback
            assert torch.equal(direct, ref), (name, way)
            # a NaN, an infinity, or a B value the scaling takes past float32's range: None
            # (the reference path then names it)
            b_value = int(plan.src[-1])
            big = 6e4 if raw.values.dtype == torch.float16 else 3e38
            for at, value, scale in ((int(plan.src[0]), float("nan"), 1.0),
                                     (b_value, float("-inf"), 1.0), (b_value, big, 1e36)):
                bad = raw.values.clone()
                bad[at] = value
                bad_raw = type(raw)(bad, raw.signature, raw.shapes, raw.starts)
                assert pack_raw(lay, paged.cfg, paged.ranks[name], plan, bad_raw, scale,
                                use_native=way) is None, (name, way, value)
        if lay.mirror_offset is not None:
            assert torch.equal(lay.bf16(ref), lay.main(ref).to(torch.bfloat16))
        paged._evict(name)
        for page in paged.pool._free:  # stale bytes where its pages will be
            paged.memory[page].random_(0, 256)
        table = paged.ensure([name])[name]
        ppp = paged.pieces_per_page
        assert len(table) == -(-len(ref) // ppp)
        for q, page in enumerate(table):
            chunk = ref[q * ppp : (q + 1) * ppp].reshape(-1)
            assert torch.equal(paged.memory[page, : chunk.numel()], chunk), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_adapter_is_packed_from_its_files_bytes_as_the_reference_packs_it(
        lora_setup, tiny_models, tmp_path, dtype):
    """Files stored in float32 (peft's), bfloat16 and float16; ranks 4 to 64, rsLoRA; a Phi
    base's fused qkv_proj and gate_up_proj (split by the plan as by the reference)."""
    base, paths = lora_setup
    paths = dict(paths)
    for kind in (torch.bfloat16, torch.float16):
        out = tmp_path / str(kind).split(".")[1]
        shutil.copytree(paths["r64"], out)
        tensors = load_file(str(out / "adapter_model.safetensors"))
        save_file({k: v.to(kind) for k, v in tensors.items()},
                  str(out / "adapter_model.safetensors"))
        paths[out.name] = out
    e = _engine(base, paths, dtype=dtype)
    try:
        _packs_as_the_reference(e, paths)
    finally:
        e.shutdown()
    phi = tiny_models("phi3")
    fused = make_peft_adapter(phi, tmp_path / "fused", 4, ["qkv_proj", "gate_up_proj"], seed=3)
    e = make_engine(phi, max_lora_rank=8, dtype=dtype)
    try:
        e.add_adapter("fused", "m", fused)
        _packs_as_the_reference(e, ["fused"])
    finally:
        e.shutdown()


def test_remove_adapter_during_a_request(lora_setup, mixed):
    base, paths = lora_setup
    names, prompts, want = mixed
    e = _engine(base, paths)
    try:
        core = e.local.core
        with e.local._lock:  # drive the core by hand for a deterministic interleaving
            log = DeltaLog()
            core.enqueue(EngineRequest("x", "r16", prompts[3],
                                           SamplingParams(max_tokens=16, temperature=0)))
            log.add(core.step())
            log.add(core.step())
            core.remove_adapter("r16")
            assert "r16" not in e.adapters
            with pytest.raises(RequestError, match="not loaded"):
                core.enqueue(EngineRequest("y", "r16", prompts[3],
                                               SamplingParams(max_tokens=4)))
            while core.has_work():
                log.add(core.step())
            assert "x" in log.final and log.tokens["x"] == want[3]  # the running one completed
            assert "r16" not in core.adapters.refs  # dropped once it finished
            assert "r16" not in core.workers["base"].adapter_pages.host
            core.check_integrity()
        assert e.local.kv.pages.num_used_pages == 0
        with pytest.raises(RequestError):
            e.generate(prompts[3], SamplingParams(max_tokens=2), model="r16")
        e.add_adapter("r16", "base", paths["r16"])  # can be loaded again
        out = e.generate(prompts[3], SamplingParams(max_tokens=16, temperature=0),
                         model="r16")[0]
        assert list(out.token_ids) == want[3]
    finally:
        e.shutdown()


def test_remove_idle_adapter_and_errors(lora_setup):
    base, paths = lora_setup
    e = _engine(base, {"r4": paths["r4"]})
    try:
        e.remove_adapter("r4")
        assert e.adapters == {}
        with pytest.raises(AdapterError, match="not loaded"):
            e.remove_adapter("r4")
        with pytest.raises(AdapterError, match="base model"):
            e.add_adapter("z", "nobase", paths["r4"])
        with pytest.raises(AdapterError, match="already"):
            e.add_adapter("base", "base", paths["r4"])
        e.check_integrity()
    finally:
        e.shutdown()


def _adapter_bytes(base, *names):
    """Bytes of the host copy of the largest of ``names`` (default: all) in the layout of
    every registered adapter (the test engines register them all)."""
    from gpupool.adapters.paged import PieceLayout, target_groups

    cfg = ModelConfig.from_folder(base)
    groups = set().union(*(target_groups(t) for _, t, _ in ADAPTERS.values()))
    lay = PieceLayout.build(cfg, groups, torch.float32, False)
    return max(cfg.num_layers * ADAPTERS[n][0] for n in names or ADAPTERS) * lay.piece_bytes


def test_device_copies_are_pages_of_the_kv_pool(lora_setup, mixed):
    """An adapter's device copy lies in pages of the arena's KV region, taken from the one
    page pool (the KV cache's), as many as its rank needs; the pages go back to the pool
    when the adapter or its base goes, and no copy outlives its adapter."""
    base, paths = lora_setup
    names, prompts, want = mixed
    e = _engine(base, paths)
    try:
        arena, pool = e.local.arena, e.local.kv.pages
        worker = e.local.core.workers["base"]
        paged = worker.adapter_pages
        free = pool.num_free_pages
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        held = pool.adapters()
        assert set(held) == {("base", n) for n in ADAPTERS}
        lo = arena.kv.data_ptr()
        for (_, name), pages in held.items():
            assert len(pages) == paged.pages_needed(name)
            for p in pages:  # every byte the kernels read lies in the KV region
                row = paged.memory[p]
                assert lo <= row.data_ptr() < row.data_ptr() + row.numel() \
                    <= lo + arena.kv_bytes
        # ranks 4 and 64 on the same layout: pages in proportion (no padding to the largest)
        assert paged.pages_needed("r4") < paged.pages_needed("r64")
        assert pool.num_adapter_pages == sum(len(p) for p in held.values())
        assert pool.num_free_pages == free  # idle copies count as free: evicted on demand
        assert e.stats()["kv_pages"]["adapters"] == pool.num_adapter_pages
        e.check_integrity()
        e.remove_adapter("r64")
        assert ("base", "r64") not in pool.adapters()
        e.remove_model("base")  # idle: dropped at once, with its adapters and their pages
        assert pool.adapters() == {} and pool.num_adapter_pages == 0
        e.check_integrity()
    finally:
        e.shutdown()


def test_a_pool_too_small_for_an_adapter_refuses_its_requests_cleanly(lora_setup):
    """A KV pool that cannot hold an adapter's device copy beside a request's KV: the
    request fails with a clear error at admission; the base model serves on and the
    adapter stays registered."""
    base, paths = lora_setup
    e = make_engine(base, name="base", max_lora_rank=64, kv_cache_bytes=6 * (64 << 10),
                    kv_page_bytes=64 << 10)
    try:
        e.add_adapter("r64", "base", paths["r64"])
        assert e.local.core.workers["base"].adapter_pages.pages_needed("r64") >= 6
        with pytest.raises(RequestError, match="KV cache"):
            e.generate([5, 6, 7], SamplingParams(max_tokens=2), model="r64")
        assert e.adapters == {"r64": "base"}
        assert len(e.generate([5, 6, 7], SamplingParams(max_tokens=2), model="base")) == 1
        e.check_integrity()
    finally:
        e.shutdown()


def test_registration_reads_no_weights_and_host_copies_have_a_budget(lora_setup, mixed,
                                                                      tmp_path, monkeypatch):
    """200 adapters register without a weight being read (the header is checked) and hold
    no host memory; with a host cache of two adapters, a mixed batch of four still matches
    peft: copies dropped from the cache are read again from disk when needed."""
    import shutil

    from gpupool.adapters import peft_format

    base, paths = lora_setup
    names, prompts, want = mixed
    reads = []
    real = peft_format.read_tensors
    monkeypatch.setattr(peft_format, "read_tensors",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    e = make_engine(base, name="base", max_lora_rank=64, max_loras_on_device=2)
    try:
        for i in range(200):
            folder = tmp_path / f"copy{i}"
            shutil.copytree(paths["r4"], folder)
            e.add_adapter(f"copy{i}", "base", folder)
        slots = e.local.core.workers["base"].adapter_pages
        assert reads == [] and slots.host_bytes == 0 and not slots.host
        assert e.local.kv.pages.num_adapter_pages == 0
    finally:
        e.shutdown()
    one = _adapter_bytes(base)  # the largest adapter's copy: the cache holds one or a few
    e = _engine(base, paths, max_loras_on_device=2, host_adapter_bytes=one)
    try:
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        slots = e.local.core.workers["base"].adapter_pages
        assert slots.host_bytes <= 2 * one  # the budget, and the one being loaded
        assert slots.num_reads > 4  # copies were dropped and read again
        e.local.check_integrity()
    finally:
        e.shutdown()


def test_kv_and_adapters_share_the_pool_under_pressure(lora_setup, mixed):
    """More adapters than the pool holds beside the KV, in a randomized stream (seeded): idle
    adapters and cached pages are evicted by one policy as requests need pages, a running
    request's adapter never is, and every output still matches peft (adapters evicted and
    brought back into other pages). The unified pool's integrity holds after every step."""
    import random

    base, paths = lora_setup
    names, prompts, want = mixed
    rng = random.Random(5)
    e = _engine(base, paths, kv_cache_bytes=48 * (16 << 10), max_num_seqs=3,
                enable_prefix_caching=True)
    try:
        core = e.local.core
        pool = e.local.kv.pages
        paged = core.workers["base"].adapter_pages
        total = sum(paged.pages_needed(n) for n in ADAPTERS)
        assert total > pool.num_pages // 2  # all of them and the KV do not fit at once
        params = SamplingParams(max_tokens=16, temperature=0)
        order = [rng.randrange(len(names)) for _ in range(24)]
        with e.local._lock:
            log = DeltaLog()
            for k, i in enumerate(order):
                core.enqueue(EngineRequest(str(k), names[i] or "base", prompts[i], params))
            while core.has_work():
                log.add(core.step())
                core.check_integrity()  # pinned running adapters included
        for k, i in enumerate(order):
            assert log.tokens[str(k)] == want[i], (k, names[i])
        assert pool.num_adapters_evicted > 0  # the stream pushed idle adapters out
        assert paged.num_loads > len(ADAPTERS)  # and brought them back
    finally:
        e.shutdown()


def test_eviction_weighs_what_each_unit_costs_to_bring_back():
    """The pool's one policy (GreedyDual): an idle adapter cheap to bring back (a host copy)
    goes before cached KV dear to recompute, though the KV was used longer ago; among units
    of one cost the least recently used goes first; pinned adapters never go. (A unit's
    cost is credit that ages: once evictions have raised L to a cached page's priority, it
    goes before an adapter just used.)"""
    pool = PagePool(10)
    pool.kv_page_cost["m"] = 1.0  # a page's prefill: 1 s
    kv = pool.allocate(3)
    for i, p in enumerate(kv):
        assert pool.register(p, bytes([i]), "m", None)
    pool.free(kv)  # three cached pages
    a = pool.allocate_adapter(("m", "a"), 3, cost_s=0.03)  # 10 ms a page to bring back
    b = pool.allocate_adapter(("m", "b"), 2, cost_s=0.02)
    pool.set_pinned({("m", "b")})  # a idle, b running
    assert pool.num_free_pages == 2 + 3 + 3  # free, cached, a's
    got = pool.allocate(4)  # 2 free, then a (cheapest), not the older cached pages
    assert got is not None and pool.adapter_pages(("m", "a")) is None
    assert pool.num_cached_pages == 3 and pool.adapter_pages(("m", "b")) == b
    pool.free(got)  # 5 free now
    assert pool.allocate(6) is not None  # 5 free + 1 cached (the least recent)
    assert pool.lookup([bytes([0])]) == [] and pool.lookup([bytes([1])]) == [kv[1]]
    assert pool.allocate(3) is None  # 2 cached left, and b is pinned: never evicted
    pool.set_pinned(())
    assert pool.allocate(3) is not None  # all: L has risen to the cached pages' priority
    assert pool.adapter_pages(("m", "b")) is None and pool.num_cached_pages == 0
    pool.check_integrity()
    assert a and b


def test_piece_layout_follows_the_targets_and_pages_the_rank(lora_setup, mixed):
    """Pieces hold the groups the registered adapters target, and an adapter takes pages
    for its own rank: r4 (q and v) alone lays out only the qkv group; registering the
    others lays the pieces out again (the adapters stay registered and are read again on
    use) and a mixed batch still matches peft. In bf16 (the fused CPU kernel, which skips
    groups an adapter does not target) r4's tokens are the same under either layout."""
    base, paths = lora_setup
    names, prompts, want = mixed
    greedy = SamplingParams(max_tokens=16, temperature=0)
    i4 = names.index("r4")
    e = make_engine(base, name="base", max_lora_rank=64)
    try:
        e.add_adapter("r4", "base", paths["r4"])
        worker = e.local.core.workers["base"]
        assert worker.adapter_pages.layout.groups == ("qkv",)
        assert list(e.generate(prompts[i4], greedy, model="r4")[0].token_ids) == want[i4]
        small = worker.adapter_pages.nbytes("r4")
        for name in ("r8", "r16", "r64"):
            e.add_adapter(name, "base", paths[name])
        assert worker.adapter_pages.layout.groups == ("qkv", "o", "gate_up", "down")
        assert worker.adapter_pages.nbytes("r4") * 16 == worker.adapter_pages.nbytes("r64")
        assert small < worker.adapter_pages.nbytes("r4")
        outs = e.generate(prompts, greedy, model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        e.check_integrity()
    finally:
        e.shutdown()
    got = []
    for others in ((), ("r64",)):
        e = make_engine(base, name="base", max_lora_rank=64, dtype="bfloat16")
        try:
            for name in ("r4", *others):
                e.add_adapter(name, "base", paths[name])
            out = e.generate(prompts[:4], greedy, model=["r4", "base", "r4", others[0]]
                             if others else ["r4", "base", "r4", "r4"])
            got.append([list(o.token_ids) for o in out][:3])
            e.check_integrity()
        finally:
            e.shutdown()
    assert got[0] == got[1]


def test_queued_requests_adapters_are_read_while_steps_run(lora_setup, mixed):
    """One sequence at a time and a host cache of two adapters: admission reads each adapter
    (checking its weights), the cache drops the older copies, and while earlier requests run
    the queued ones' adapters are read again in the background; their first steps take those
    copies. Outputs match peft."""
    base, paths = lora_setup
    names, prompts, want = mixed
    order = ["r4", "r8", "r16", "r64"]
    idx = [names.index(n) for n in order]
    e = _engine(base, paths, max_num_seqs=1, host_adapter_bytes=_adapter_bytes(base, "r64"))
    try:
        slots = e.local.core.workers["base"].adapter_pages
        outs = e.generate([prompts[i] for i in idx], SamplingParams(max_tokens=16,
                                                                    temperature=0),
                          model=order)
        assert [list(o.token_ids) for o in outs] == [want[i] for i in idx]
        assert slots.num_prefetched == 3  # r8, r16, r64: each dropped before its turn
        e.check_integrity()
    finally:
        e.shutdown()


def test_one_tenants_adapters_cannot_push_out_anothers(lora_setup, mixed):
    """Three device copies, one sequence a step: tenant b's adapter runs, then tenant a's
    three. With max_loras_per_tenant=2, a's third load evicts a's own least recent and b's
    adapter
    stays on the device (never loaded again); without the cap it is the one evicted. A step
    holds at most 2 distinct adapters of one tenant. Outputs match peft either way."""
    base, paths = lora_setup
    names, prompts, want = mixed
    order = ["r8", "r16", "r64"]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    for cap in (None, 2):
        e = _engine(base, paths, max_loras_on_device=3, max_num_seqs=1,
                    max_loras_per_tenant=cap)
        try:
            slots = e.local.core.workers["base"].adapter_pages
            i4 = names.index("r4")
            out = e.generate(prompts[i4], greedy, model="r4", tenant="b")
            assert list(out[0].token_ids) == want[i4][:8]
            for name in order:
                i = names.index(name)
                out = e.generate(prompts[i], greedy, model=name, tenant="a")
                assert list(out[0].token_ids) == want[i][:8]
            assert ("r4" in slots.resident) == (cap == 2), cap
            if cap == 2:
                assert sorted(n for n, t in slots.owner.items() if t == "a") == ["r16", "r64"]
                assert slots.num_loads == 4
            e.check_integrity()
        finally:
            e.shutdown()
    # the scheduler: a step takes at most 2 of one tenant's distinct adapters
    e = _engine(base, paths, max_loras_per_tenant=2)
    try:
        core = e.local.core
        steps = []
        execute = core.workers["base"].execute
        core.workers["base"].execute = lambda rows: (
            steps.append({r.adapter for r in rows if r.adapter}) or execute(rows))
        idx = [names.index(n) for n in ("r4", *order)]
        outs = e.generate([prompts[i] for i in idx], greedy, model=["r4", *order],
                          tenant="a")
        assert [list(o.token_ids) for o in outs] == [want[i][:8] for i in idx]
        assert steps and max(len(s) for s in steps) == 2
    finally:
        e.shutdown()


def test_a_shared_adapter_is_charged_to_the_tenant_using_it(tiny_models):
    """Three device copies, a cap of one a tenant: tenant a loaded X; now tenant b's row uses
    X and a brings Y. X is charged to b (its user now), so a holds one copy (Y), not two."""
    cfg = ModelConfig.from_folder(tiny_models("llama"))
    pool = PagePool(64)
    memory = torch.zeros(64, 16 << 10, dtype=torch.uint8)
    paged = AdapterPages(cfg, {"qkv"}, torch.float32, pool, memory, "m", max_resident=3)
    for name in ("C", "X", "Y", "Z"):
        paged.add(name, 4, dict)  # no weights: zero pieces are enough here
    for name, tenant in (("C", "c"), ("X", "a"), ("Z", "z")):
        pool.set_pinned(())
        paged.ensure({name}, {name: tenant}, 1)
    pool.set_pinned(())
    paged.ensure({"X", "Y"}, {"X": "b", "Y": "a"}, 1)
    assert paged.owner == {"X": "b", "Y": "a", "Z": "z"}  # C, the least recent, evicted
    assert set(paged.resident) == {"X", "Y", "Z"}
    paged.check_integrity()
    pool.check_integrity()


def test_replace_an_adapter_in_place_during_a_request(lora_setup, mixed):
    """vLLM's load_inplace: the running request finishes on the old weights, the next gets
    the new, the old version is dropped once idle, and the two never share cached KV (the
    second request's prompt is the first's, which the prefix cache holds)."""
    base, paths = lora_setup
    names, prompts, want = mixed
    e = _engine(base, {"x": paths["r16"]}, enable_prefix_caching=True)
    try:
        core = e.local.core
        prompt = prompts[3] * 3  # long enough to fill cached pages
        new = peft_greedy(base, {"r8": paths["r8"]}, [prompt], ["r8"], 8)[0]
        old = peft_greedy(base, {"r16": paths["r16"]}, [prompt], ["r16"], 8)[0]
        assert new != old
        params = SamplingParams(max_tokens=8, temperature=0)
        with e.local._lock:
            log = DeltaLog()
            core.enqueue(EngineRequest("a", "x", prompt, params))
            log.add(core.step())
            log.add(core.step())
            core.add_adapter("x", "base", str(paths["r8"]), replace=True)
            assert e.adapters == {"x": "base"}
            core.enqueue(EngineRequest("b", "x", prompt, params))
            while core.has_work():
                log.add(core.step())
            assert log.tokens["a"] == old and log.tokens["b"] == new
            assert set(core.adapters.refs) == {"x#2"}  # the old version dropped when idle
            core.check_integrity()
        again = e.generate(prompt, params, model="x")[0]  # the cache serves one version
        assert again.cached_tokens > 0 and list(again.token_ids) == new
        with pytest.raises(AdapterError, match="nothing to replace"):
            e.add_adapter("nope", "base", paths["r8"], replace=True)
        with pytest.raises(AdapterError, match="already"):
            e.add_adapter("x", "base", paths["r8"])  # without replace: taken
        e.add_adapter("x", "base", paths["r16"], replace=True)  # back, idle: dropped at once
        assert set(core.adapters.refs) == {"x#3"}
        assert list(e.generate(prompt, params, model="x")[0].token_ids) == old
        with pytest.raises(RequestError):  # a version's own name is no adapter's
            e.generate(prompt, params, model="x#3")
        e.remove_adapter("x")
        assert e.adapters == {} and not core.adapters.refs
        # a version still draining is never reused by a name added and replaced again
        with e.local._lock:
            core.add_adapter("y", "base", str(paths["r16"]))
            core.add_adapter("y", "base", str(paths["r8"]), replace=True)  # y#2
            core.enqueue(EngineRequest("c", "y", prompt, params))
            core.step()
            core.remove_adapter("y")  # y#2 drains
            core.add_adapter("y", "base", str(paths["r16"]))
            core.add_adapter("y", "base", str(paths["r8"]), replace=True)
            assert set(core.adapters.refs) >= {"y#2", "y#3"}
            while core.has_work():
                core.step()
            assert set(core.adapters.refs) == {"y#3"}
            core.check_integrity()
        e.check_integrity()
    finally:
        e.shutdown()


def test_a_registration_that_would_strand_a_request_is_refused(lora_setup, mixed):
    """Admission checked a request against its adapter's pages; registering an adapter on
    other projections lays the pieces out again, larger, so that adapter takes more pages:
    where a request in flight would then no longer fit the pool (it would wait for ever),
    the registration is refused with the reason and nothing changes; once the request is
    done it goes through. An old config's adapter_bytes is ignored with a warning."""
    base, paths = lora_setup
    names, prompts, want = mixed
    page = 4 << 10  # small pages: q/v pieces fit 3 to a rank-4 adapter, every group's 8
    e = make_engine(base, name="base", max_lora_rank=64, kv_page_bytes=page,
                    kv_cache_bytes=(256 * page) // 8 + 4 * page)  # 256 tokens' KV + 4 pages
    try:
        e.add_adapter("r4", "base", paths["r4"])  # q and v: small pieces
        core, worker = e.local.core, e.local.core.workers["base"]
        grown = worker.pages_after(ADAPTERS["r64"][1])
        pool, bt = e.local.kv.pages.num_pages, worker.block_tokens
        tokens = worker.cfg.max_model_len  # fits now, not with the grown adapter
        assert -(-tokens // bt) + worker.adapter_pages.pages_needed("r4") <= pool
        assert -(-tokens // bt) + grown["r4"] > pool
        with e.local._lock:
            core.enqueue(EngineRequest("x", "r4", prompts[1][:4], SamplingParams(
                max_tokens=tokens - 4, temperature=0, ignore_eos=True)))
            with pytest.raises(AdapterError, match="would then not fit"):
                core.add_adapter("r64", "base", str(paths["r64"]))
            assert set(core.adapters.refs) == {"r4"}
            assert worker.adapter_pages.layout.groups == ("qkv",)
            core.abort("x")
            while core.has_work():
                core.step()
        e.add_adapter("r64", "base", paths["r64"])  # nothing in flight: laid out again
        assert worker.adapter_pages.pages_needed("r4") == grown["r4"]
        e.check_integrity()
    finally:
        e.shutdown()
    from gpupool.config import PoolConfig

    assert PoolConfig(adapter_bytes=1 << 30).adapter_bytes == 1 << 30  # accepted, ignored


def test_packing_runs_make_the_same_moves():
    """PackPlan's runs (dst, src, n, stride, scaled) expand to exactly its value moves:
    consecutive destinations with evenly spaced sources (strides 1, r and others, turns of
    stride inside a stretch, single values), broken at pieces and where B's begin."""
    from gpupool.adapters.paged import _runs
    g = torch.Generator().manual_seed(5)
    per_piece, dst, src = 40, [], []
    for piece in range(30):  # odd pieces filled to their end, the next from its start on
        at = piece * per_piece + (0 if piece % 2 == 0 else int(torch.randint(0, 3, (),
                                                                          generator=g)))
        while at < (piece + 1) * per_piece - (0 if piece % 2 else 2):
            n = int(torch.randint(1, 9, (), generator=g))
            n = min(n, (piece + 1) * per_piece - at)
            stride = int(torch.randint(-3, 9, (), generator=g))
            s0 = int(torch.randint(100, 10_000, (), generator=g))
            dst += range(at, at + n)
            src += [s0 + j * stride for j in range(n)]
            at += n + int(torch.randint(0, 2, (), generator=g))  # a gap or none
    dst, src = torch.tensor(dst), torch.tensor(src, dtype=torch.int32)
    num_a = len(dst) // 2
    runs = _runs(dst, src, num_a, per_piece)
    got_d, got_s, got_b = [], [], []
    for d0, s0, n, stride, scaled in runs.tolist():
        assert n >= 1 and d0 // per_piece == (d0 + n - 1) // per_piece
        got_d += range(d0, d0 + n)
        got_s += [s0 + j * stride for j in range(n)]
        got_b += [scaled] * n
    assert got_d == dst.tolist() and got_s == src.tolist()
    assert got_b == [0] * num_a + [1] * (len(dst) - num_a)
    assert len(runs) < len(dst) // 2  # runs, not values one by one
