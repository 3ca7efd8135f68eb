"""Multi-LoRA against peft: mixed batches of base and adapter rows, slots, removal, and the
slots' home in the arena's adapter region."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpupool import AdapterError, RequestError, SamplingParams
from gpupool.adapters.peft_format import read_raw
from gpupool.adapters.slots import (
    AdapterSlots,
    fill_mirror,
    group_ranks,
    pack_adapter,
    pack_raw,
)
from gpupool.engine.core import batch_rows
from gpupool.messages.types import EngineRequest
from gpupool.models.config import ModelConfig
from gpupool.models.loaded import LoadedModel
from gpupool.pool.arena import ALIGN
from gpupool.pool.kv import KVStorage
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


def test_more_adapters_than_slots(lora_setup, mixed):
    base, paths = lora_setup
    names, prompts, want = mixed
    e = _engine(base, paths, max_loras_on_device=2)
    try:
        slots = e.local.core.workers["base"].slots
        per_step, ensure = [], slots.ensure
        slots.ensure = lambda names, *a: per_step.append(set(names)) or ensure(names, *a)
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        assert max(len(s) for s in per_step) == 2  # never more adapters than slots
        assert set().union(*per_step) == set(ADAPTERS)
        assert slots.num_loads >= len(ADAPTERS) and len(slots.resident) <= 2
        e.check_integrity()
    finally:
        e.shutdown()


def test_requests_whose_adapter_is_on_the_device_go_first(lora_setup, mixed):
    """One slot holding r4; a request for r8 queued before two for r4: the r4 requests run
    first (one load, r8's) unless the preference is off (adapter_wait_ms=0: r8 first, then r4
    loaded again). Outputs match peft either way."""
    base, paths = lora_setup
    names, prompts, want = mixed
    i4, i8 = names.index("r4"), names.index("r8")
    for wait_ms, loads in ((500.0, 2), (0.0, 3)):
        e = _engine(base, paths, max_loras_on_device=1, adapter_wait_ms=wait_ms)
        try:
            slots = e.local.core.workers["base"].slots
            params = SamplingParams(max_tokens=16, temperature=0)
            assert list(e.generate([prompts[i4]], params, model="r4")[0].token_ids) == want[i4]
            outs = e.generate([prompts[i8], prompts[i4], prompts[i4]], params,
                              model=["r8", "r4", "r4"])
            assert [list(o.token_ids) for o in outs] == [want[i8], want[i4], want[i4]]
            assert slots.num_loads == loads, wait_ms
            e.check_integrity()
        finally:
            e.shutdown()


def _packs_as_the_reference(engine, names) -> None:
    """Each adapter's host copy packed from its file's bytes by a plan equals the reference
    packing bit for bit, and the bf16 mirror filled by one gather equals fill_mirror's."""
    slots = engine.local.core.workers[next(iter(engine.local.core.workers))].slots
    for name in names:
        fast = slots._pack(name)
        spec = slots.loaders[name].spec
        raw = read_raw(spec.path)
        plan = slots._plans[raw.signature, slots.ranks[name]]
        assert plan.masks == spec.layers  # so _pack took the plan, not the fallback
        direct = pack_raw(slots.layout, slots.dtype, plan, raw, spec.scaling)
        assert direct is not None  # the plan's path, not the fallback
        ref = pack_adapter(slots.layout, slots.cfg, slots.ranks[name], slots.loaders[name])
        assert torch.equal(fast, ref) and torch.equal(direct, ref), name
        if slots.mirror is not None:
            slot = slots.ensure([name])[name]
            got = slots._mirror_rows[slot].clone()
            slots._mirror_rows[slot].zero_()
            fill_mirror(slots.mirror, slots.views, slots.cfg.num_layers, slot)
            assert torch.equal(got, slots._mirror_rows[slot]), name


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
            assert "r16" not in core.workers["base"].slots.host
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


def _slot_bytes(base, num_slots, *names):
    """Bytes of ``num_slots`` slots laid out for the adapters ``names`` (default: all)."""
    ranks = group_ranks([(ADAPTERS[n][0], ADAPTERS[n][1]) for n in names or ADAPTERS])
    return AdapterSlots.num_bytes(ModelConfig.from_folder(base), num_slots, ranks,
                                  torch.float32)


def test_slots_are_views_into_the_arena_adapter_region(lora_setup):
    base, paths = lora_setup
    e = _engine(base, paths, max_loras_on_device=3)
    try:
        arena, slots = e.local.arena, e.local.core.workers["base"].slots
        lo = arena.adapters.data_ptr()
        hi = lo + arena.adapter_bytes
        assert arena.weights.data_ptr() + arena.weight_bytes == lo  # the region, not KV
        assert slots.buffer.untyped_storage().data_ptr() == arena.buffer.data_ptr()
        offset = arena.adapter_owners["base"]
        assert slots.buffer.data_ptr() == lo + offset
        assert slots.buffer.numel() == _slot_bytes(base, 3)
        assert lo <= slots.buffer.data_ptr() < slots.buffer.data_ptr() + slots.buffer.numel() <= hi
        for v in slots.views.values():  # every tensor the kernels read lies in the region
            assert v.untyped_storage().data_ptr() == arena.buffer.data_ptr()
            assert lo <= v.data_ptr() < hi
        used = arena.adapter_slabs.num_bytes - arena.adapter_slabs.num_free_bytes
        assert used == -(-_slot_bytes(base, 3) // ALIGN) * ALIGN  # one range, this base's
        # a load writes the arena's bytes: the slot the step got holds the adapter's host copy
        slot = slots.ensure({"r16"})["r16"]
        start = offset + slot * slots.layout.num_bytes
        assert torch.equal(arena.adapters[start : start + slots.layout.num_bytes],
                           slots.load_host("r16"))
        e.check_integrity()
    finally:
        e.shutdown()


def test_adapter_space_returns_when_the_base_or_its_last_adapter_goes(lora_setup, mixed):
    """A region that holds one base's slots: the second base gets them only once the first
    has given its range back, by losing its last adapter or by being removed."""
    base, paths = lora_setup
    names, prompts, want = mixed
    # two slots for r8 hold two for r4 (q, v at rank 4) but not two more for r8 beside them
    e = make_engine(max_lora_rank=64, max_loras_on_device=2,
                    adapter_bytes=_slot_bytes(base, 2, "r8"))
    try:
        e.add_model("a", base)
        e.add_model("b", base)
        arena = e.local.arena
        e.add_adapter("r4", "a", paths["r4"])
        with pytest.raises(AdapterError, match="adapter region"):
            e.add_adapter("r8", "b", paths["r8"])
        assert e.adapters == {"r4": "a"} and e.local.core.workers["b"].slots is None
        assert list(arena.adapter_owners) == ["a"]
        e.check_integrity()
        e.remove_adapter("r4")  # a's last adapter: its range goes back
        assert arena.adapter_owners == {} and e.local.core.workers["a"].slots is None
        assert arena.adapter_slabs.num_free_bytes == arena.adapter_bytes
        e.add_adapter("r8", "b", paths["r8"])
        with pytest.raises(AdapterError, match="adapter region"):
            e.add_adapter("r4", "a", paths["r4"])
        e.remove_model("b")  # idle: dropped at once, with its adapters and their range
        assert e.models == ["a"] and arena.adapter_owners == {} and e.adapters == {}
        e.check_integrity()
        e.add_adapter("r4", "a", paths["r4"])
        out = e.generate(prompts[1], SamplingParams(max_tokens=16, temperature=0), model="r4")
        assert names[1] == "r4" and list(out[0].token_ids) == want[1]
        e.check_integrity()
    finally:
        e.shutdown()


def test_too_small_adapter_region_refuses_cleanly(lora_setup):
    base, paths = lora_setup
    need = _slot_bytes(base, 4, "r4")
    e = make_engine(base, name="base", max_lora_rank=64, max_loras_on_device=4,
                    adapter_bytes=need - ALIGN)
    try:
        with pytest.raises(AdapterError, match=r"adapter slots.*adapter region.*adapter_bytes"):
            e.add_adapter("r4", "base", paths["r4"])
        worker = e.local.core.workers["base"]
        assert e.adapters == {} and not e.local.core.adapters.refs
        assert worker.slots is None and worker.adapter_targets == {}
        assert e.local.arena.adapter_owners == {}
        assert e.local.arena.adapter_slabs.num_free_bytes == e.local.arena.adapter_bytes
        e.check_integrity()
        with pytest.raises(RequestError, match="not loaded"):
            e.generate([5, 6, 7], SamplingParams(max_tokens=2), model="r4")
        assert len(e.generate([5, 6, 7], SamplingParams(max_tokens=2), model="base")) == 1
    finally:
        e.shutdown()


def test_a_worker_without_a_pool_serves_no_adapters(lora_setup):
    base, _ = lora_setup
    worker = LoadedModel("m", base, torch.device("cpu"), KVStorage(4, 16 << 10, "cpu"))
    with pytest.raises(AdapterError, match="adapter region"):
        worker.add_adapter("x", 4, ("q_proj",), dict)
    assert worker.slots is None and worker.adapter_targets == {}


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
        slots = e.local.core.workers["base"].slots
        assert reads == [] and slots.host_bytes == 0 and not slots.host
    finally:
        e.shutdown()
    one = _slot_bytes(base, 1)
    e = _engine(base, paths, max_loras_on_device=2, host_adapter_bytes=2 * one)
    try:
        outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                          model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        slots = e.local.core.workers["base"].slots
        assert slots.host_bytes <= 2 * one + one  # the budget, and the one being loaded
        assert slots.num_reads > 4  # copies were dropped and read again
        e.local.check_integrity()
    finally:
        e.shutdown()


def test_slots_follow_demand_within_the_adapter_region(lora_setup, mixed):
    """max_loras_on_device unset (the default): a base starts with one slot and a step with
    more distinct adapters grows them (moved to a larger range with their contents), as far
    as the adapter region holds; past that, steps hold what fits. Outputs match peft either
    way, and the arena accounts for exactly one range."""
    base, paths = lora_setup
    names, prompts, want = mixed
    for region_slots in (None, 3):
        # a region of 3 slots: 1 -> 2 and no further (a growth allocates beside the old range)
        extra = {} if region_slots is None else {"adapter_bytes": _slot_bytes(base, 3)}
        e = _engine(base, paths, **extra)
        try:
            worker = e.local.core.workers["base"]
            assert worker.slots.num_slots == 1 and worker.adapter_config.max_loras_on_device \
                is None
            per_step, grow = [], worker._grow_slots
            worker._grow_slots = lambda n, log=per_step, grow=grow: log.append(n) or grow(n)
            outs = e.generate(prompts, SamplingParams(max_tokens=16, temperature=0),
                              model=[n or "base" for n in names])
            assert [list(o.token_ids) for o in outs] == want
            slots, arena = worker.slots, e.local.arena
            assert per_step and slots.num_slots >= max(per_step)
            if region_slots is None:  # every adapter of the batch at once, once grown
                assert slots.num_slots >= len(ADAPTERS)
            else:
                assert slots.num_slots == 2
            used = arena.adapter_slabs.num_bytes - arena.adapter_slabs.num_free_bytes
            assert used == -(-_slot_bytes(base, slots.num_slots) // ALIGN) * ALIGN
            assert list(arena.adapter_owners) == ["base"]
            e.check_integrity()
        finally:
            e.shutdown()


def test_slot_layout_follows_the_registered_ranks_and_targets(lora_setup, mixed):
    """Slots are sized for the adapters registered, not for max_lora_rank on every
    projection: r4 (q and v at rank 4) alone takes a sliver of a slot of r64's layout;
    registering the others lays the slots out again (the adapters stay registered and are
    read again on use) and a mixed batch still matches peft. A region too small for a new
    layout refuses that registration and keeps serving the adapters it had. In bf16 (the
    fused CPU kernel, which skips groups an adapter does not target) r4's tokens are the same
    under either layout."""
    from gpupool.adapters.base import GROUPS

    base, paths = lora_setup
    names, prompts, want = mixed
    greedy = SamplingParams(max_tokens=16, temperature=0)
    i4 = names.index("r4")
    e = make_engine(base, name="base", max_lora_rank=64)
    try:
        e.add_adapter("r4", "base", paths["r4"])
        worker = e.local.core.workers["base"]
        assert worker.slots.group_ranks == {"qkv": 4}
        assert worker.slots.buffer.numel() == _slot_bytes(base, 1, "r4")
        assert _slot_bytes(base, 1, "r4") * 20 < _slot_bytes(base, 1)
        assert list(e.generate(prompts[i4], greedy, model="r4")[0].token_ids) == want[i4]
        for name in ("r8", "r16", "r64"):
            e.add_adapter(name, "base", paths[name])
        assert worker.slots.group_ranks == {g: 64 for g in GROUPS}
        outs = e.generate(prompts, greedy, model=[n or "base" for n in names])
        assert [list(o.token_ids) for o in outs] == want
        e.check_integrity()
    finally:
        e.shutdown()
    e = make_engine(base, name="base", max_lora_rank=64, max_loras_on_device=2,
                    adapter_bytes=_slot_bytes(base, 2, "r4"))
    try:
        e.add_adapter("r4", "base", paths["r4"])
        with pytest.raises(AdapterError, match="adapter region"):
            e.add_adapter("r8", "base", paths["r8"])
        worker = e.local.core.workers["base"]
        assert e.adapters == {"r4": "base"} and worker.slots.group_ranks == {"qkv": 4}
        assert list(e.generate(prompts[i4], greedy, model="r4")[0].token_ids) == want[i4]
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
    e = _engine(base, paths, max_num_seqs=1, host_adapter_bytes=2 * _slot_bytes(base, 1))
    try:
        slots = e.local.core.workers["base"].slots
        outs = e.generate([prompts[i] for i in idx], SamplingParams(max_tokens=16,
                                                                    temperature=0),
                          model=order)
        assert [list(o.token_ids) for o in outs] == [want[i] for i in idx]
        assert slots.num_prefetched == 3  # r8, r16, r64: each dropped before its turn
        e.check_integrity()
    finally:
        e.shutdown()


def test_one_tenants_adapters_cannot_push_out_anothers(lora_setup, mixed):
    """Three slots, one sequence a step: tenant b's adapter runs, then tenant a's three. With
    max_loras_per_tenant=2, a's third load takes a's own least recent slot and b's adapter
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
            slots = e.local.core.workers["base"].slots
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
    """Three slots, a cap of one a tenant: tenant a loaded X; now tenant b's row uses X and
    a brings Y. X is charged to b (its user now), so a holds one slot (Y), not two."""
    cfg = ModelConfig.from_folder(tiny_models("llama"))
    ranks = {"qkv": 4}
    memory = torch.zeros(AdapterSlots.num_bytes(cfg, 3, ranks, torch.float32),
                         dtype=torch.uint8)
    slots = AdapterSlots(cfg, 3, ranks, torch.float32, memory)
    for name in ("C", "X", "Y", "Z"):
        slots.add(name, 4, dict)  # no weights: zero slots are enough here
    for name, tenant in (("C", "c"), ("X", "a"), ("Z", "z")):
        slots.ensure({name}, {name: tenant}, 1)
    slots.ensure({"X", "Y"}, {"X": "b", "Y": "a"}, 1)
    assert slots.owner == {"X": "b", "Y": "a", "Z": "z"}  # C, the least recent, evicted
    slots.check_integrity()


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
