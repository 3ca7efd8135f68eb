"""Same request, same tokens: a request's logits at every step do not depend on what shares its
steps, how its prompt is chunked, whether its prefix came from the cache, a preemption, or a
resume in a fresh engine (bf16 and bf16 + int8, with and without adapters), on the backend the
engine selects on this machine.

The observable is the target request's float32 logits row at each output index, captured where
the engine hands a step's logits to sampling (``engine.output.sample_step``), compared bit for
bit with the same request run alone in a fresh engine; its greedy tokens and a seeded sampled
request's tokens then agree too. Hypothesis draws the scenarios (partners joining and leaving so
that steps hold 1 to more than 64 rows, chunk budgets, the cache, a KV pool small enough to
preempt) from a fixed seed, so a run is reproducible.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from gpupool.engine import output as output_module
from gpupool.messages.params import SamplingParams
from gpupool.messages.types import EngineRequest
from tests.factories import make_engine, make_peft_adapter, random_prompts

VARIANTS = {"bf16": None, "bf16+int8": "int8"}
# the torch backend's fixed-order ops (kernels.fixed: GPUPOOL_NATIVE=0, no compiler, a CPU
# without AVX2, float32): variant -> (dtype, quantization)
TORCH_VARIANTS = {"torch-bf16": ("bfloat16", None), "torch-bf16+int8": ("bfloat16", "int8"),
                  "torch-fp32": ("float32", None)}
TARGET_PROMPT = random_prompts(1, 45, 45, seed=11)[0]
STEPS = 20  # output tokens of the targets: more than 16 steps (weights were packed after 16)
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=STEPS, temperature=1.0, top_p=0.9, seed=1234,
                         ignore_eos=True)
ADAPTERS = ("a4", "a8")  # rank 4 on attention, rank 8 on the MLP


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    folder = tiny_models("llama")
    root = tmp_path_factory.mktemp("invariance")
    adapters = {
        "a4": make_peft_adapter(folder, root / "a4", 4, ["q_proj", "v_proj", "o_proj"], seed=3),
        "a8": make_peft_adapter(folder, root / "a8", 8, ["gate_proj", "up_proj", "down_proj"],
                                seed=4),
    }
    return folder, adapters, {}


_ADAPTER_BYTES: dict = {}


def _adapter_bytes(folder, adapters, variant) -> int:
    """Bytes of the pages both adapters' device copies take in ``variant``'s engine."""
    if variant not in _ADAPTER_BYTES:
        engine = _engine(folder, adapters, VARIANTS.get(variant, variant))
        try:
            paged = engine.local.core.workers["m"].adapter_pages
            _ADAPTER_BYTES[variant] = sum(paged.pages_needed(n) for n in adapters) \
                * engine.local.kv.page_bytes
        finally:
            engine.shutdown()
    return _ADAPTER_BYTES[variant]


def _engine(folder, adapters, quant, **overrides):
    """``quant``: a VARIANTS value (the backend this machine selects in bf16) or a
    TORCH_VARIANTS key (the torch backend)."""
    opts = {"dtype": "bfloat16", "max_num_seqs": 128, "max_lora_rank": 8,
            "max_loras_on_device": 3, **overrides}
    if quant in TORCH_VARIANTS:
        opts["native"] = False
        opts["dtype"], quant = TORCH_VARIANTS[quant]
    if quant:
        opts["quantization"] = quant
    engine = make_engine(folder, **opts)
    for name, path in adapters.items():
        engine.add_adapter(name, "m", path)
    return engine


class Capture:
    """The logits rows of some requests by output index, from every step's sampling."""

    def __init__(self, ids):
        self.ids, self.rows = set(ids), {i: {} for i in ids}

    def __enter__(self):
        real = self.real = output_module.sample_step

        def spy(tracked, logits, *args, **kwargs):
            for i, tr in enumerate(tracked):
                rid = tr.seq.request_id
                if rid in self.ids:
                    index = len(tr.seq.output_token_ids)
                    assert index not in self.rows[rid], "a token sampled twice"
                    self.rows[rid][index] = logits[i].clone()
            return real(tracked, logits, *args, **kwargs)

        output_module.sample_step = spy
        return self

    def __exit__(self, *exc):
        output_module.sample_step = self.real


def _run(engine, requests, late=(), late_after=0):
    """Submit ``requests``; once the first has ``late_after`` tokens, submit ``late``; wait for
    all. Returns token ids by request id."""
    tokens = {r.request_id: [] for r in (*requests, *late)}
    left = threading.Semaphore(0)
    first = requests[0].request_id
    start_late = threading.Event()

    def sink_for(rid):
        def sink(delta):
            tokens[rid].extend(delta.token_ids)
            if rid == first and len(tokens[rid]) >= late_after:
                start_late.set()
            if delta.finished:
                assert delta.error is None, delta.error
                left.release()
        return sink

    engine.local.submit(list(requests), [sink_for(r.request_id) for r in requests])
    if late:
        assert start_late.wait(60)
        engine.local.submit(list(late), [sink_for(r.request_id) for r in late])
    for _ in range(len(requests) + len(late)):
        assert left.acquire(timeout=120)
    return tokens


def _targets(adapter):
    model = adapter or "m"
    return [EngineRequest("greedy", model, TARGET_PROMPT, GREEDY),
            EngineRequest("sampled", model, TARGET_PROMPT, SAMPLED)]


def _alone(setup, variant, adapter):
    """The targets' logits rows and tokens run alone in a fresh engine (cached per case)."""
    folder, adapters, cache = setup
    key = (variant, adapter)
    if key not in cache:
        engine = _engine(folder, adapters, VARIANTS.get(variant, variant))
        try:
            with Capture(["greedy", "sampled"]) as cap:
                tokens = _run(engine, _targets(adapter))
            ops = engine.local.core.workers["m"].model.ops  # bound: its claim is final
            cache[key] = (cap.rows, tokens) if ops.batch_invariant else repr(ops)
        finally:
            engine.shutdown()
    if isinstance(cache[key], str):
        pytest.skip(f"the backend this machine selects for {variant} ({cache[key]}) does not "
                    "claim batch invariance (README: 'Same request, same tokens')")
    return cache[key]


def _assert_same_logits(got_rows, want_rows, first=0):
    for rid in ("greedy", "sampled"):
        assert set(got_rows[rid]) == set(range(first, STEPS)), rid
        for index, row in got_rows[rid].items():
            assert torch.equal(row.view(torch.int32), want_rows[rid][index].view(torch.int32)), \
                f"{rid}: logits at output index {index} differ"


scenario = st.fixed_dictionaries({
    "variant": st.sampled_from(sorted(VARIANTS)),
    "adapter": st.sampled_from([None, *ADAPTERS]),
    "partners": st.integers(0, 80),
    "late": st.integers(0, 24),
    "late_after": st.integers(1, 12),
    "budget": st.sampled_from([7, 16, 33, 100, 1024]),
    "prefill_cap": st.sampled_from([None, 5, 17]),
    "cached": st.booleans(),
    "small_pool": st.booleans(),
    "seed": st.integers(0, 1 << 16),
})


@seed(29)
@settings(max_examples=25, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(case=scenario)
def test_a_requests_logits_do_not_depend_on_its_batch_chunks_or_cache(setup, case):
    _check_scenario(setup, case)


@seed(30)
@settings(max_examples=9, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(case=scenario.map(lambda c: {**c, "partners": c["partners"] // 2})
       .flatmap(lambda c: st.sampled_from(sorted(TORCH_VARIANTS))
                .map(lambda v: {**c, "variant": v})))
def test_the_torch_backend_is_invariant_too(setup, case):
    """The same property on the torch backend (kernels.fixed), in bf16, bf16 + int8 and
    float32: what a machine without the native kernels runs."""
    _check_scenario(setup, case)


def _check_scenario(setup, case):
    folder, adapters, _ = setup
    want_rows, want_tokens = _alone(setup, case["variant"], case["adapter"])
    g = torch.Generator().manual_seed(case["seed"])

    def partner(i, prefix):
        n = int(torch.randint(1, 60, (1,), generator=g))
        prompt = random_prompts(1, n, n, seed=case["seed"] * 1000 + i)[0]
        name = (None, *ADAPTERS)[int(torch.randint(0, 3, (1,), generator=g))]
        steps = int(torch.randint(1, 30, (1,), generator=g))
        return EngineRequest(f"{prefix}{i}", name or "m", prompt,
                             SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))

    pool = {"kv_cache_bytes": 96 << 10, "host_kv_bytes": 0} if case["small_pool"] else {}
    if case["small_pool"] and case["variant"] == "torch-fp32":  # float32 pages: twice the bytes
        pool["kv_cache_bytes"] *= 2
    if case["small_pool"]:  # the adapters' device copies share the pool: room for them too
        pool["kv_cache_bytes"] += _adapter_bytes(folder, adapters, case["variant"])
    engine = _engine(folder, adapters, VARIANTS.get(case["variant"], case["variant"]),
                     max_num_batched_tokens=case["budget"],
                     max_prefill_tokens_while_decoding=case["prefill_cap"], **pool)
    try:
        if case["cached"]:  # the target's prompt pages computed once already
            _run(engine, [EngineRequest("warm", case["adapter"] or "m", TARGET_PROMPT,
                                        SamplingParams(max_tokens=1))])
        first = [partner(i, "p") for i in range(case["partners"])]
        late = [partner(i, "l") for i in range(case["late"])]
        targets = _targets(case["adapter"])
        with Capture(["greedy", "sampled"]) as cap:
            got = _run(engine, [*targets, *first], late, case["late_after"])
        _assert_same_logits(cap.rows, want_rows)
        assert got["greedy"] == want_tokens["greedy"]
        assert got["sampled"] == want_tokens["sampled"]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", [*sorted(VARIANTS), "torch-bf16"])
def test_a_resumed_request_continues_with_the_same_logits(setup, variant):
    """Resumed from k delivered tokens in a fresh engine (as the cluster moves a stream), the
    request's later logits are those of the uninterrupted run."""
    folder, adapters, _ = setup
    want_rows, want_tokens = _alone(setup, variant, "a4")
    for k in (1, 9):
        engine = _engine(folder, adapters, VARIANTS.get(variant, variant))
        try:
            resumed = [EngineRequest(r.request_id, r.model, r.prompt_token_ids, r.params,
                                     delivered_token_ids=want_tokens[r.request_id][:k])
                       for r in _targets("a4")]
            partners = [EngineRequest(f"p{i}", "m", p, GREEDY)
                        for i, p in enumerate(random_prompts(6, 3, 30, seed=k))]
            with Capture(["greedy", "sampled"]) as cap:
                got = _run(engine, [*resumed, *partners])
            for rid in ("greedy", "sampled"):
                assert want_tokens[rid][:k] + got[rid] == want_tokens[rid], rid
            _assert_same_logits(cap.rows, want_rows, first=k)
        finally:
            engine.shutdown()


def test_a_model_with_per_head_qk_norms_is_invariant_too(tiny_models):
    """Qwen3 (RMSNorm over each head of q and k before RoPE): the target's logits alone equal
    those among 30 partners with a 7-token chunk budget, its prefix computed or cached."""
    folder = tiny_models("qwen3")
    alone = _engine(folder, {}, None)
    try:
        with Capture(["greedy", "sampled"]) as cap:
            want_tokens = _run(alone, _targets(None))
        ops = alone.local.core.workers["m"].model.ops
        if not ops.batch_invariant:
            pytest.skip(f"the backend this machine selects for Qwen3 in bf16 ({ops!r}) does "
                        "not claim batch invariance (README: 'Same request, same tokens')")
    finally:
        alone.shutdown()
    for cached in (False, True):
        engine = _engine(folder, {}, None, max_num_batched_tokens=7)
        try:
            if cached:
                _run(engine, [EngineRequest("warm", "m", TARGET_PROMPT,
                                            SamplingParams(max_tokens=1))])
            partners = [EngineRequest(f"p{i}", "m", p, SamplingParams(
                max_tokens=3 + i % 17, temperature=0, ignore_eos=True))
                for i, p in enumerate(random_prompts(30, 1, 40, seed=7))]
            with Capture(["greedy", "sampled"]) as busy:
                got = _run(engine, [*_targets(None), *partners])
            _assert_same_logits(busy.rows, cap.rows)
            assert got["greedy"] == want_tokens["greedy"]
            assert got["sampled"] == want_tokens["sampled"]
        finally:
            engine.shutdown()


def test_an_avx2_worker_gives_an_avx512_workers_tokens_and_logprobs(tiny_models, tmp_path):
    """The kernels' AVX2 build (what a CPU without AVX-512 runs) and the AVX-512 BF16 one
    compute the same bits, whole model included: a stream the cluster moves between such
    workers continues exactly. Two processes, one a build, 8 prompts x 16 greedy tokens with
    their top-5 logprobs, Llama, Qwen3 (per-head q/k norms) and Llama in int8."""
    import subprocess
    import sys

    from gpupool.kernels import native
    from gpupool.models.cpu import cpu_flags
    from tests import TESTS_PACKAGE

    flags = cpu_flags()
    if not {"avx2", "fma", "avx512_bf16"} <= flags or native._compiler() is None:
        pytest.skip("needs a C compiler and a CPU with AVX2, FMA and AVX-512 BF16 (to run "
                    "both builds)")
    code = f"""
{TESTS_PACKAGE}
import sys
from tests.factories import make_engine, random_prompts
from gpupool import SamplingParams
from gpupool.kernels import native
for arg in sys.argv[1:]:
    folder, _, quantization = arg.partition("+")
    e = make_engine(dtype="bfloat16")
    e.add_model("m", folder, quantization=quantization or None)
    assert e.local.core.workers["m"].model.ops.batch_invariant
    outs = e.generate(random_prompts(8, 4, 60, seed=61), SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, logprobs=5))
    print("ISA", native.gemv_isa(), [(list(o.token_ids), o.logprobs) for o in outs])
    e.shutdown()
"""
    folders = [str(tiny_models("llama")), str(tiny_models("qwen3")),
               f"{tiny_models('llama')}+int8"]
    runs = {}
    for march in ("x86-64-v3", "native"):
        proc = subprocess.run([sys.executable, "-P", "-c", code, *folders], capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "GPUPOOL_NATIVE_MARCH": march})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[march] = [ln for ln in proc.stdout.splitlines() if ln.startswith("ISA")]
    assert [r.split()[1] for r in runs["x86-64-v3"]] == ["avx2"] * 3
    assert [r.split()[1] for r in runs["native"]] == ["avx512_bf16"] * 3
    assert [r.split(None, 2)[2] for r in runs["x86-64-v3"]] == \
        [r.split(None, 2)[2] for r in runs["native"]]


def test_this_machine_claims_invariance_where_the_kernels_are_built(setup):
    """On a CPU with AVX-512 BF16 and a C compiler the bf16 backend must claim it (so the
    tests above cannot skip here unnoticed)."""
    from gpupool.kernels import native

    folder, adapters, _ = setup
    engine = _engine(folder, {}, None)
    try:
        engine.generate([TARGET_PROMPT], SamplingParams(max_tokens=1))
        ops = engine.local.core.workers["m"].model.ops
        if native.available() and native.has_gemv() and native.has_prefill_attention(16):
            assert ops.batch_invariant
    finally:
        engine.shutdown()


def test_over_http_a_cache_hit_and_a_busy_server_give_the_same_tokens(tiny_models,
                                                                     tmp_path_factory):
    """The case a user met (bf16, temperature 0): the same request on a prefix-cache miss and
    on the hit that follows, under two salts, and sent among concurrent requests that share
    its steps, gives the same 64 tokens every time."""
    import concurrent.futures

    from fastapi.testclient import TestClient

    from gpupool.api.server import build_state, create_app
    from gpupool.config import ModelSpec, ServerConfig
    from gpupool.llm import local_client

    folder = tiny_models("llama")
    config = ServerConfig(
        admin_key="admin-key-for-invariance", models=(ModelSpec("tiny", str(folder)),),
        engine={"device": "cpu", "dtype": "bfloat16", "home": tmp_path_factory.mktemp("home"),
                "kv_cache_bytes": 8 << 20, "kv_page_bytes": 16 << 10})
    state = build_state(config, local_client(config))
    prompt = " ".join(f"w{3 + (11 * i) % 150}" for i in range(150))  # two full pages and more
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 64, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}
    admin = {"Authorization": "Bearer admin-key-for-invariance"}
    with TestClient(create_app(state)) as client:
        ops = state.client.engine.core.workers["tiny"].model.ops
        client.post("/v1/completions", headers=admin, json={**body, "max_tokens": 1})
        if not ops.batch_invariant:
            pytest.skip(f"the backend this machine selects for bf16 ({ops!r}) does not claim "
                        "batch invariance")

        def complete(**extra):
            r = client.post("/v1/completions", headers=admin, json={**body, **extra})
            assert r.status_code == 200, r.text
            out = r.json()
            lp = out["choices"][0]["logprobs"]  # the tokens and their logprobs, exactly
            return ((lp["tokens"], lp["token_logprobs"]),
                    out["usage"]["prompt_tokens_details"]["cached_tokens"])

        runs = [complete(cache_salt=salt) for salt in ("a", "a", "b", "b")]
        assert [cached > 0 for _, cached in runs] == [False, True, False, True]
        want = runs[0][0]
        assert len(want[0]) == 64 and all(tokens == want for tokens, _ in runs)
        others = [" ".join(f"w{5 + (k * j) % 140}" for j in range(3 + 9 * k)) for k in range(12)]
        with concurrent.futures.ThreadPoolExecutor(13) as pool:
            busy = [pool.submit(client.post, "/v1/completions", headers=admin,
                                json={**body, "prompt": p, "max_tokens": 40}) for p in others]
            target = pool.submit(complete, cache_salt="c")
            assert all(f.result().status_code == 200 for f in busy)
            assert target.result()[0] == want


def test_the_fast_path_is_opt_in_and_says_it_is_not_invariant(tiny_models):
    """Config.batch_invariant=False (GPUPOOL_BATCH_INVARIANT=0) trades the guarantee for
    torch's products on large steps: the backend no longer claims it, and its large steps
    leave the native products."""
    from gpupool.config import Config

    assert Config().batch_invariant and not Config.from_env(batch_invariant=False).batch_invariant
    folder = tiny_models("llama")
    engine = make_engine(folder, dtype="bfloat16", quantization="int8", batch_invariant=False)
    try:
        engine.generate([TARGET_PROMPT], SamplingParams(max_tokens=2))
        ops = engine.local.core.workers["m"].model.ops
        assert not ops.batch_invariant and ops.packs_weights
        model = engine.local.core.workers["m"].model
        big = type("Batch", (), {"num_tokens": 40})()
        small = type("Batch", (), {"num_tokens": 3})()
        assert not ops.plan(model, big).gemv
        assert ops.plan(model, small).gemv == native_int8()
    finally:
        engine.shutdown()


def native_int8() -> bool:
    from gpupool.kernels import native

    return native.has_gemv_int8()
