"""Tensor parallelism's forward pass (issue 35, first part): a model sharded over 2 gloo ranks
(processes) on CPU against the same model on one rank, in float32: prefill and greedy decode
through the paged KV, identical tokens and logits within 1e-4 relative; a model with one KV
head (replicated on both ranks); refusals naming the counts that do not divide."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpupool.models.config import ModelConfig
from gpupool.models.errors import ModelLoadError
from tests.factories import make_tiny_model
from tests.tp_rank import greedy

RANK = Path(__file__).with_name("tp_rank.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_kv_head_model(folder):
    import transformers

    from tests.factories import make_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        initializer_range=0.5, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    make_tokenizer(folder)
    return folder


def test_two_ranks_give_one_ranks_tokens_and_logits(tmp_path):
    folders = [str(make_tiny_model(tmp_path / "llama", "llama")),  # 2 KV heads: one a rank
               str(make_tiny_model(tmp_path / "qwen2", "qwen2")),  # biases, tied embedding
               str(_one_kv_head_model(tmp_path / "mqa"))]  # 1 KV head: replicated
    out = tmp_path / "tp.pt"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-P", str(RANK), port, str(r), "2", str(out),
                               *folders]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = torch.load(out)
    for f in folders:
        want_tokens, want_logits = greedy(f)
        tokens, logits = got[f]
        assert tokens == want_tokens, f
        for a, b in zip(logits, want_logits):
            assert a.shape == b.shape
            # the ranks' partial sums added in another order: within 1e-4 of the largest
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (f, (a - b).abs().max())


def test_a_command_keeps_its_tensors_whatever_their_kind():
    """ShmCommands' framing (a pickle, the tensors' bytes behind it, each 64-aligned): empty,
    0-dim, bool, int32 and non-contiguous tensors and nested containers come back equal, and a
    second message after the first one's acknowledgement too."""
    import os

    from gpupool.models.tp import ShmCommands

    path = ShmCommands.create()
    try:
        sender, receiver = ShmCommands(path, 0), ShmCommands(path, 1)
        wide = torch.arange(12, dtype=torch.float32).view(3, 4)
        msg = ("forward", "m", {"a": torch.empty(0, dtype=torch.int64),
                                "b": torch.tensor(7), "c": torch.tensor([True, False, True]),
                                "d": wide.t(), "e": [torch.arange(5, dtype=torch.int32)]},
               [["x", 3], [None, 2]])
        for _ in range(2):
            sender.send(msg)
            got = receiver.receive()
            assert got[0] == "forward" and got[1] == "m" and got[3] == msg[3]
            for k, v in msg[2].items():
                g = got[2][k]
                if isinstance(v, list):
                    v, g = v[0], g[0]
                assert g.dtype == v.dtype and g.shape == v.shape and torch.equal(g, v), k
    finally:
        os.unlink(path)


def test_counts_that_do_not_divide_are_refused_by_name(tmp_path):
    from gpupool.models import tp

    cfg = ModelConfig.from_folder(make_tiny_model(tmp_path / "m", "llama"))
    with pytest.raises(ModelLoadError, match="4 attention heads"):
        tp.local_config(cfg, 3)
    local = tp.local_config(cfg, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size,
            local.vocab_size) == (2, 1, 64, cfg.vocab_size // 2)
    odd = json.loads((tmp_path / "m" / "config.json").read_text())
    odd["intermediate_size"] = 130
    with pytest.raises(ModelLoadError, match="intermediate size 130"):
        tp.local_config(ModelConfig.from_dict(odd), 4)


def test_an_engine_of_two_ranks_gives_one_ranks_tokens(tmp_path):
    """``Engine(tensor_parallel=2)``: the same greedy tokens as a one-rank engine for a
    batch, again on prefix-cache hits, after preemptions in a small KV pool (pages swapped to
    the host on both ranks), and across a switch between two models in a weight region that
    holds one."""
    from gpupool import SamplingParams
    from gpupool.models.loader import build_layout
    from tests.factories import make_engine, random_prompts

    a = make_tiny_model(tmp_path / "a", "llama")
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=1)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(6, 20, 40, seed=3)
    region = build_layout(ModelConfig.from_folder(b), torch.float32).num_bytes + 4096
    want = {}
    one = make_engine(weight_bytes=2 * region, kv_cache_bytes=1 << 20)
    try:
        for name, folder in (("a", a), ("b", b)):
            one.add_model(name, folder)
            want[name] = [o.token_ids for o in one.generate(prompts, params, model=name)]
    finally:
        one.shutdown()
    two = make_engine(tensor_parallel=2, weight_bytes=region, kv_cache_bytes=64 << 10,
                      kv_page_bytes=4 << 10, prefetch=False)
    try:
        two.add_model("a", a)
        two.add_model("b", b)
        ranks = two.local.tp  # its shared files mapped by every rank, their names gone
        assert not Path(ranks.shm_path).exists() and not Path(ranks.cmd_path).exists()
        for _ in range(2):  # one model's weights at a time: a switch each
            for name in ("a", "b"):
                got = [o.token_ids for o in two.generate(prompts, params, model=name)]
                assert got == want[name], name
        for _ in range(2):  # one request at a time: the second one's prompt pages cached
            assert two.generate([prompts[0]], params, model="a")[0].token_ids == want["a"][0]
        stats = two.stats()
        assert stats["swaps"]["weight_swaps"] >= 3
        models = stats["models"]
        assert sum(m["preemptions"] for m in models.values()) > 0  # a small KV pool
        assert two.local.kv.num_pages_swapped_out > 0  # both ranks' shares moved (a rank
        # that kept its pages while they were reused would give other tokens: tested)
        assert models["a"]["prefix_cache_hits"] > 0
        two.remove_model("b")  # every rank drops b's shard; added again, it serves as before
        two.add_model("b", b)
        got = [o.token_ids for o in two.generate(prompts, params, model="b")]
        assert got == want["b"]
    finally:
        two.shutdown()


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss",
                                     "gpt_oss_mxfp4"])
def test_a_mixture_of_experts_on_two_ranks_gives_one_ranks_tokens(tmp_path, variant):
    """The router replicated, each expert split as a dense MLP (gate/up rows, down columns
    of its own intermediate size), the experts' weighted partial sums all-reduced once a
    layer: a batch's greedy tokens are the one-rank engine's (float32). OLMoE's whole-vector
    q/k norms: their weights cut as q's and k's rows, each row's sums of squares added over
    the ranks; refused by name where KV heads would be replicated. gpt-oss: each rank its
    heads' sinks, the o and experts' down biases added once (rank 0's), its stacked
    experts' [gate | up] rows cut as a fused gate_up's; its MXFP4 experts kept 4-bit (the
    codebook, exponent-byte scales), each rank the down columns of its half of the
    intermediate size (whole groups of 32)."""
    from gpupool import SamplingParams
    from gpupool.models import tp
    from tests.factories import make_engine, make_mxfp4_twins, random_prompts

    base = make_tiny_model(tmp_path / "m", variant.removesuffix("_mxfp4"))
    if variant.endswith("_mxfp4"):
        base = make_mxfp4_twins(base, tmp_path)[0]
    prompts = random_prompts(5, 6, 30, seed=9)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = {}
    for world in (1, 2):
        e = make_engine(base, **({"tensor_parallel": 2, "prefetch": False}
                                 if world == 2 else {}))
        try:
            got[world] = [list(o.token_ids) for o in e.generate(prompts, params)]
            if variant.endswith("_mxfp4"):  # kept 4-bit
                assert "experts.0.down_weight_gcode" in e.local.core.workers["m"].model.layers[0]
        finally:
            e.shutdown()
    assert got[2] == got[1]
    local = tp.local_config(ModelConfig.from_folder(base), 2)
    assert local.moe_intermediate_size * 2 == ModelConfig.from_folder(base).moe_intermediate_size
    if variant == "olmoe":
        cfg = ModelConfig.from_folder(base)
        with pytest.raises(ModelLoadError, match="whole-vector q/k norms"):
            tp.local_config(cfg, 2 * cfg.num_kv_heads)


def test_a_4bit_weight_a_shard_would_cut_between_groups_is_refused_by_name():
    """MXFP4's groups of 32 (no config names them): a rank's input columns of a down
    projection must be whole groups, else a clear load error, not a wrong shard."""
    from gpupool.kernels import quant4
    from gpupool.models import tp
    from gpupool.models.quantized import mxfp4

    w = mxfp4(torch.zeros(8, 2, 16, dtype=torch.uint8),
              torch.full((8, 2), 127, dtype=torch.uint8))
    assert w.shape == (8, 64) and w.code.tolist() == list(quant4.E2M1)
    cfg = ModelConfig("GptOssForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=64,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5,
                      max_position_embeddings=64, rope_theta=1e4, moe_intermediate_size=64)
    src = "model.layers.0.mlp.experts.down_proj[0]"
    assert tp.shard(cfg, "layers.0.experts.0.down_weight", src, w, 2, 1).shape == (8, 32)
    with pytest.raises(ModelLoadError, match="cut groups of 32"):
        tp.shard(cfg, "layers.0.experts.0.down_weight", src, w, 4, 1)


def test_own_4bit_weights_on_two_ranks_give_one_ranks_tokens(tmp_path):
    """``--quantization int4`` on a sharded model: each rank quantizes its part (groups of 32
    columns, which each rank's columns hold whole: the row-parallel o and down cut at a
    group boundary), so its weights are the one-rank model's and so are the greedy tokens;
    an adapter on the 4-bit base too."""
    from gpupool import SamplingParams
    from tests.factories import make_engine, make_peft_adapter, random_prompts

    base = make_tiny_model(tmp_path / "m", "llama")
    lora = make_peft_adapter(base, tmp_path / "lora", 4, ["q_proj", "o_proj", "down_proj"],
                             seed=2)
    p0, p1 = random_prompts(2, 6, 24, seed=7)
    prompts = [p0, p0, p1, p1]  # each with the adapter and without
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    names = ["lora", "m", "lora", "m"]
    got = {}
    for world in (1, 2):
        e = make_engine(base, quantization="int4", max_lora_rank=8,
                        **({"tensor_parallel": 2, "prefetch": False} if world == 2 else {}))
        try:
            e.add_adapter("lora", "m", lora)
            got[world] = [list(o.token_ids) for o in e.generate(prompts, params, model=names)]
        finally:
            e.shutdown()
    assert got[2] == got[1]
    assert got[1][0] != got[1][1] or got[1][2] != got[1][3]  # the adapter acts


@pytest.mark.parametrize("variant", ["llama", "one_kv_head"])
def test_adapters_on_two_ranks_match_peft(tmp_path, variant):
    """LoRA on a model sharded over 2 ranks (S-LoRA's split: q/k/v and gate/up's B cut to
    each rank's rows, A whole; o and down's A cut to each rank's input columns, their shrinks
    summed over the ranks before the whole B): a mixed batch (base rows, three adapters of
    ranks 2, 4, 8 on every projection or some) has peft's greedy tokens; then an adapter
    of a larger rank is registered (pages for its own rank), and a removed one is refused, with
    peft's tokens still. A model with one KV head: its k/v rows replicated on both ranks."""
    from gpupool import SamplingParams
    from gpupool.messages.errors import RequestError
    from tests.factories import make_engine, make_peft_adapter, peft_greedy, random_prompts

    base = (make_tiny_model(tmp_path / "m", "llama") if variant == "llama"
            else _one_kv_head_model(tmp_path / "m"))
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    specs = {"x": (4, ["q_proj", "v_proj", "down_proj"]), "y": (8, every),
             "z": (2, ["o_proj", "k_proj"]), "big": (16, every)}
    paths = {n: make_peft_adapter(base, tmp_path / n, r, t, seed=i)
             for i, (n, (r, t)) in enumerate(specs.items())}
    names = ["x", None, "y", "z", "y", "x", None, "z"]
    prompts = random_prompts(len(names), 6, 24, seed=5)
    want = peft_greedy(base, paths, prompts, names, 10)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    two = make_engine(base, tensor_parallel=2, max_lora_rank=16, prefetch=False)
    try:
        for n in ("x", "y", "z"):
            two.add_adapter(n, "m", paths[n])
        got = two.generate(prompts, params, model=[n or "m" for n in names])
        # peft stops at EOS; ours runs on (ignore_eos): its tokens up to there
        assert [list(o.token_ids)[: len(w)] for o, w in zip(got, want)] == want
        two.add_adapter("big", "m", paths["big"])  # rank 16: pages for its own rank
        two.remove_adapter("z")
        again = ["big", "y", None, "big"]
        want2 = peft_greedy(base, paths, prompts[:4], again, 10)
        got = two.generate(prompts[:4], params, model=[n or "m" for n in again])
        assert [list(o.token_ids)[: len(w)] for o, w in zip(got, want2)] == want2
        with pytest.raises(RequestError, match="z"):
            two.generate(prompts[:1], params, model="z")
        for n in ("x", "y", "big"):  # every adapter gone: both ranks drop their pages
            two.remove_adapter(n)
        two.add_adapter("z2", "m", paths["z"])  # a rank-2 layout of two groups on both ranks
        got = two.generate(prompts[:2], params, model="z2")
        want3 = peft_greedy(base, paths, prompts[:2], ["z", "z"], 10)
        assert [list(o.token_ids)[: len(w)] for o, w in zip(got, want3)] == want3
        two.check_integrity()
    finally:
        two.shutdown()


def test_an_adapter_a_rank_cannot_read_fails_its_requests_not_the_group(tmp_path):
    """Rank 0 holds its part of the adapter (read at admission); the file then breaks, so
    rank 1's own read fails: every rank hears of it before the step (a sum over the ranks),
    none runs it, the request fails, and the group serves on."""
    from gpupool import SamplingParams
    from tests.factories import make_engine, make_peft_adapter, random_prompts

    base = make_tiny_model(tmp_path / "m", "llama")
    path = make_peft_adapter(base, tmp_path / "x", 4, ["q_proj", "o_proj"], seed=1)
    prompts = random_prompts(2, 6, 20, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    two = make_engine(base, tensor_parallel=2, max_lora_rank=8, prefetch=False)
    try:
        two.add_adapter("x", "m", path)
        two.local.core.workers["m"].adapter_pages.load_host("x")  # rank 0's copy, before the step
        (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        try:
            out, err = two.generate(prompts[:1], params, model="x")[0], None
        except Exception as e:  # the error itself: also a failed request
            out, err = None, e
        if err is None:
            assert out.finish_reason == "abort" and not out.token_ids
        else:
            assert "could not read an adapter" in str(err), err
        assert two.local.tp.alive()
        assert len(two.generate(prompts, params, model="m")[1].token_ids) == 6
    finally:
        two.shutdown()


def test_a_dead_rank_fails_the_step_instead_of_hanging(tmp_path):
    """SIGKILL of rank 1: rank 0's next step fails within seconds (its wait for the dead
    rank's share notices the process is gone), the engine still answers and shuts down."""
    import time

    from gpupool import SamplingParams
    from tests.factories import make_engine

    folder = make_tiny_model(tmp_path / "m", "llama")
    two = make_engine(folder, tensor_parallel=2)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0)
        assert len(two.generate([[1, 2, 3]], params)[0].token_ids) == 4
        two.local.tp.procs[0].kill()
        two.local.tp.procs[0].wait()
        start = time.monotonic()
        out = two.generate([[4, 5, 6]], params)[0]  # a failed step aborts its requests
        assert out.finish_reason == "abort" and "rank is gone" in (out.error or "")
        assert time.monotonic() - start < 30
    finally:
        two.shutdown()


def test_a_dead_rank_takes_its_group_down_and_streams_move_to_a_group_of_its_degree(
        tmp_path):
    """A cluster of two workers of 2 ranks each: streams on one group, SIGKILL of its rank 1
    mid-stream: the group's worker exits (it leaves the registry), every stream finishes on
    the other group with the text one engine gives (fp32 greedy: the ranks' sums agree)."""
    import signal
    import threading

    import httpx
    import psutil

    openai = pytest.importorskip("openai")
    from gpupool import SamplingParams
    from tests.cluster import ADMIN, Cluster
    from tests.factories import make_engine, random_prompts
    from tests.test_cluster import _pool, _stream, _wait_for

    root = tmp_path / "models"
    llama = make_tiny_model(root / "llama", "llama")
    prompts = random_prompts(4, 4, 10, seed=5)
    one = make_engine(llama, "llama")
    try:
        want = [o.text for o in one.generate(
            prompts, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))]
    finally:
        one.shutdown()
    c = Cluster(root, tmp_path / "home")
    try:
        for name in ("tpA", "tpB"):
            c.start_worker(name, "--tensor-parallel", "2")
        gw = c.gateway("--model", f"llama={llama}")
        try:
            client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
            client.completions.create(model="llama", prompt=prompts[0], max_tokens=1)
            holder = _wait_for(lambda: [w["name"] for w in _pool(gw, True)
                                        if "llama" in w["models"]])
            assert len(holder) == 1
            victim = holder[0]
            chunks = [[] for _ in prompts]
            threads = [threading.Thread(target=_stream, args=(client, "llama", p, 120, ch),
                                        kwargs={"temperature": 0})
                       for p, ch in zip(prompts, chunks)]
            for t in threads:
                t.start()
            _wait_for(lambda: all(len(ch) >= 3 for ch in chunks), timeout=60, step=0.005)
            rank1 = psutil.Process(c.workers[victim].pid).children()[0]
            rank1.send_signal(signal.SIGKILL)
            assert c.workers[victim].wait(timeout=30) != 0  # the group went down
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)
            for i, ch in enumerate(chunks):
                assert "".join(text for _, text, _ in ch) == want[i], i
                assert ch[-1][2] == "length"
            assert victim not in {w["name"] for w in _pool(gw)}
            assert int(c.r.get("gpupool:cluster:redispatched") or 0) == len(prompts)
            assert httpx.get(gw.url + "/admin/pool", headers=ADMIN).status_code == 200
        finally:
            gw.stop()
    finally:
        c.close()


def test_a_bf16_tensor_parallel_request_has_the_same_tokens_in_any_batch(tmp_path):
    """bf16 on 2 ranks (the native per-op kernels, the shared-memory sums in rank order): a
    request's greedy tokens alone equal its tokens beside others ("Same request, same
    tokens" holds under tensor parallelism)."""
    from gpupool import SamplingParams
    from tests.factories import make_engine, random_prompts

    folder = make_tiny_model(tmp_path / "m", "llama")
    two = make_engine(folder, tensor_parallel=2, dtype="bfloat16")
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        prompts = random_prompts(5, 3, 30, seed=9)
        together = [o.token_ids for o in two.generate(prompts, params)]
        alone = [two.generate([p], params)[0].token_ids for p in prompts]
        assert together == alone
        assert two.local.core.workers["m"].model.ops.batch_invariant
    finally:
        two.shutdown()


@pytest.mark.parametrize("variant,adapter", [("llama", False), ("llama", True),
                                             ("qwen2_window", False), ("qwen3", True)])
def test_a_bf16_decode_step_on_two_ranks_runs_in_one_native_call_with_the_per_op_bits(
        tmp_path, monkeypatch, variant, adapter):
    """bf16 decode on 2 ranks: each rank's step is one native call with the o and down
    products' all-reduces inside it (through the same shared-memory exchange); its tokens and
    log-probabilities equal those of rank 0's per-op path (its whole-step call turned off:
    rank 1 keeps its own, the exchanges follow one protocol). With an adapter on every
    projection, its terms are inside the call too, the o and down shrinks summed over the
    ranks there. Qwen2 with a windowed layer: its pages a KV group of their own on every
    rank, released behind the window. Qwen3: each rank's heads' q and k norms in the call."""
    from gpupool import SamplingParams
    from gpupool.kernels import native
    from gpupool.kernels.backend import NativeOps
    from tests.factories import make_engine, random_prompts

    calls = []
    real = native.decode_layers
    monkeypatch.setattr(native, "decode_layers",
                        lambda *a, **k: calls.append((k.get("tp"), a[20] if len(a) > 20
                                                      else k.get("lora"))) or real(*a, **k))
    folder = make_tiny_model(tmp_path / "m", variant)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = random_prompts(4, 3, 30, seed=5)
    model = "m"
    if adapter:
        from tests.factories import make_peft_adapter

        every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        path = make_peft_adapter(folder, tmp_path / "a", 4, every, seed=3)
        model = "a"
    outs = []
    for whole in (True, False):
        if not whole:
            monkeypatch.setattr(NativeOps, "decode_step", lambda self, *a: None)
        # (Qwen2's: pages of 32 tokens of a layer on a rank, so the window's are released)
        two = make_engine(folder, tensor_parallel=2, dtype="bfloat16",
                          **({"kv_page_bytes": 2 << 10} if variant == "qwen2_window" else {}))
        try:
            if adapter:
                two.add_adapter("a", "m", path)
            got = two.generate(prompts, params, model=model)
            assert all(o.error is None and len(o.token_ids) == 12 for o in got)
            outs.append([(list(o.token_ids), o.logprobs) for o in got])
            released = two.local.core.scheduler.num_released_pages
            assert (released > 0) == (variant == "qwen2_window")
        finally:
            two.shutdown()
        if whole:
            if not native.has_gemv():
                pytest.skip("this CPU's native build has no bf16 product")
            assert calls and all(tp is not None for tp, _ in calls)
            assert any(lora is not None for _, lora in calls) == adapter
            calls.clear()
    assert not calls
    assert outs[0] == outs[1]


def test_a_dead_rank_fails_a_native_decode_step_instead_of_hanging(tmp_path):
    """SIGKILL of rank 1 between two bf16 decode steps: rank 0's next step, waiting inside the
    native call for the dead rank's share, asks the group's alive() and fails within seconds
    (the embedding's exchange before the call, in Python, would notice first: rank 0 skips it
    once rank 1 is dead, so the wait that notices is the native one); the request ends with
    the native call's error, the engine still answers."""
    import threading
    import time

    from gpupool import SamplingParams
    from gpupool.kernels import native
    from tests.factories import make_engine

    if not native.has_gemv():
        pytest.skip("this CPU's native build has no bf16 product")
    folder = make_tiny_model(tmp_path / "m", "llama")
    two = make_engine(folder, tensor_parallel=2, dtype="bfloat16")
    try:
        deltas, done, killed = [], threading.Event(), []

        model = two.local.core.workers["m"].model

        def sink(delta):  # the engine's thread, between steps
            deltas.append(delta)
            if len(deltas) == 3:
                two.local.tp.procs[0].kill()
                killed.append(time.monotonic())
                model._embed_tp = lambda ids: model.embed(ids * 0)  # no exchange; garbage
            if delta.finished:
                done.set()

        two.add_request([1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0,
                                                  ignore_eos=True), sink=sink)
        assert done.wait(60)
        assert killed and time.monotonic() - killed[0] < 30
        assert deltas[-1].finish_reason == "abort"
        assert "rank is gone or did not answer" in deltas[-1].error  # native.decode_layers'
        assert sum(len(d.token_ids) for d in deltas) < 200
        assert two.generate([[1, 2]], SamplingParams(max_tokens=2))[0].finish_reason == "abort"
    finally:
        two.shutdown()


def test_torchrun_starts_a_tensor_parallel_server_whose_rank_0_serves(tmp_path):
    """``torchrun --nproc-per-node 2 gpupool serve --tensor-parallel 2``: rank 0 serves and
    starts no rank of its own, rank 1 follows it (torch.distributed from torchrun's
    environment); a completion gives the one-rank engine's greedy tokens; SIGTERM ends
    every process."""
    import httpx
    import psutil

    from gpupool import SamplingParams
    from tests.factories import make_engine
    from tests.serving import Server, free_port

    folder = make_tiny_model(tmp_path / "m", "llama")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python")
    prompt = [5, 9, 23, 41, 7]
    with Server(tmp_path / "home", "--model", f"tiny={folder}", "--tensor-parallel", "2",
                launcher=launcher, kv=1 << 20, page=16 << 10) as s:
        out = httpx.post(s.url + "/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}, timeout=60).json()
        ranks = [p for p in psutil.Process(s.proc.pid).children()
                 if "redis" not in p.name()]
        assert len(ranks) == 2  # torchrun's two processes, ...
        for rank in ranks:  # ... neither with a rank process of its own
            assert not [c for c in rank.children() if "redis" not in c.name()]
    one = make_engine(folder)
    try:
        want = one.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                     ignore_eos=True))[0].text
    finally:
        one.shutdown()
    assert out["choices"][0]["text"] == want


@pytest.mark.parametrize("method,sym,fmt", [("gptq", False, "gptq"), ("gptq", True, "gptq_v2"),
                                            ("awq", False, "gptq")])
def test_4bit_checkpoints_on_two_ranks_give_one_ranks_tokens(tmp_path, method, sym, fmt):
    """GPTQ (asymmetric v1, symmetric v2) and AWQ checkpoints with groups of 32 columns,
    sharded as they come (each rank's rows of q/k/v/gate/up, whole groups of o's and down's
    columns, still 4-bit): greedy tokens equal to the one-rank engine's (fp32)."""
    from gpupool import SamplingParams
    from tests.factories import make_engine, random_prompts
    from tests.test_int4 import _write_quantized

    folder = make_tiny_model(tmp_path / "m", "llama")
    ckpt, _ = _write_quantized(folder, tmp_path / "q", tmp_path / "twin", method, 32, sym,
                               False, fmt)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(4, 3, 20, seed=4)
    outs = []
    for tp in (1, 2):
        e = make_engine(ckpt, **({"tensor_parallel": 2, "prefetch": False} if tp == 2 else {}))
        try:
            outs.append([o.token_ids for o in e.generate(prompts, params)])
            if tp == 2:
                w = e.local.core.workers["m"]
                w.make_resident()
                assert w.model.w["layers.0.down_weight"].dtype == torch.uint8  # 4-bit shard
                assert w.model.w["layers.0.down_weight"].shape == (64, 32)  # 64 of 128 cols
        finally:
            e.shutdown()
    assert outs[0] == outs[1]


def test_4bit_checkpoints_whose_groups_a_shard_would_cut_are_refused(tmp_path):
    """Groups of 64 columns over 2 ranks: o_proj's 64 input columns split into 32 a rank,
    half a group: refused, naming it; act-order GPTQ: refused."""
    from gpupool.models.errors import ModelLoadError
    from tests.factories import make_engine
    from tests.test_int4 import _write_quantized

    folder = make_tiny_model(tmp_path / "m", "llama")
    for sub, act_order in (("g64", False), ("act", True)):
        ckpt, _ = _write_quantized(folder, tmp_path / sub, tmp_path / f"{sub}-twin", "gptq",
                                   64 if not act_order else 32, True, act_order)
        cfg = ModelConfig.from_folder(ckpt)
        why = cfg.tp_refusal(2)
        assert why and ("o_proj" in why if not act_order else "act-order" in why)
    e = make_engine(tensor_parallel=2)
    try:
        with pytest.raises(ModelLoadError, match="o_proj"):
            e.add_model("g64", tmp_path / "g64")
    finally:
        e.shutdown()


def test_torchrun_without_a_matching_tensor_parallel_size_stops_every_rank_at_once(tmp_path):
    """torchrun's 2 processes with --tensor-parallel left out: each says what to pass and
    exits 2 (no rank waits for a rank 0 that never joins: the run ends at once, not after a
    rank's 120 s wait), leaving nothing in /dev/shm. (torchrun stops the other worker when
    one exits: on a loaded machine the second may be stopped before it has printed.)"""
    import glob
    import os
    import time

    from tests.serving import free_port

    before = set(glob.glob("/dev/shm/gpupool-tp-*"))
    start = time.monotonic()
    exe = [sys.executable, "-P", "-m", "gpupool.cli"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-port", str(free_port()), "--no-python", *exe, "serve", "--port",
         str(free_port())], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "GPUPOOL_HOME": str(tmp_path / "home")})
    assert proc.returncode != 0
    assert proc.stderr.count("run 'serve --tensor-parallel 2' under it") >= 1
    assert time.monotonic() - start < 60
    assert set(glob.glob("/dev/shm/gpupool-tp-*")) <= before


def test_the_fused_lora_kernel_under_tensor_parallelism_sums_the_row_parallel_shrinks(
        tmp_path):
    """bf16 adapters on 2 ranks (simulated in threads, each with its shard in pages of its
    own): the fused CPU kernel runs under tensor parallelism, a row-parallel group (o, down)
    as its shrink, the sum over the ranks, then its expand (native.lora_half); against one
    rank's fused kernel on the whole adapter: a column-parallel group's columns bit for bit,
    a row-parallel group's terms within a bf16 step (the partial shrinks' float32 sums in
    another order)."""
    import threading

    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.batch import LoraBatch
    from gpupool.adapters.paged import AdapterPages, target_groups
    from gpupool.kernels import native
    from gpupool.kernels.backend import NativeOps
    from gpupool.models import tp
    from gpupool.pool.pages import PagePool

    if not native.available():
        pytest.skip("the native kernels do not build here")
    cfg = ModelConfig.from_folder(make_tiny_model(tmp_path / "m", "llama"))
    local = tp.local_config(cfg, 2)
    g = torch.Generator().manual_seed(7)
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    width = {"hidden": cfg.hidden_size, "q": cfg.q_size, "kv": cfg.kv_size,
             "inter": cfg.intermediate_size}
    weights = {(layer, p): (torch.randn(4, width[fan_in], generator=g) * 0.3,
                            torch.randn(width[fan_out], 4, generator=g) * 0.3)
               for layer in range(cfg.num_layers) for fan_in, projs in GROUPS.values()
               for p, fan_out in projs}

    def pages(c, w):
        paged = AdapterPages(c, target_groups(every), torch.float32, PagePool(64),
                             torch.zeros(64, 16 << 10, dtype=torch.uint8), "m", mirror=True)
        paged.add("a", 4, lambda: w)
        return paged, paged.ensure(["a"])
    rows = [None, "a", "a", "a", None]
    whole, tables = pages(cfg, weights)
    one = LoraBatch.build(rows, tables, whole, {"a": every}, "cpu", NativeOps(), batched=True)
    x = {k: torch.randn(len(rows), width[f], generator=g).to(torch.bfloat16)
         for k, f in (("hidden", "hidden"), ("q", "q"), ("inter", "inter"))}
    parts, barrier = [None, None], threading.Barrier(2)

    def reduce_for(rank):
        def reduce(h):
            parts[rank] = h
            barrier.wait()
            total = parts[0] + parts[1]  # rank order, as TPGroup.all_reduce adds
            barrier.wait()
            return total
        return reduce
    got = [None, None]

    def rank_run(rank):
        paged, tabs = pages(local, tp.shard_adapter(cfg, weights, 2, rank))
        batch = LoraBatch.build(rows, tabs, paged, {"a": every}, "cpu", NativeOps(),
                                batched=True, reduce=reduce_for(rank))
        assert batch.native is not None
        out = {}
        for layer in range(cfg.num_layers):
            for group, (_, projs) in GROUPS.items():
                if group in ("o", "down"):  # the rank's input columns of a row-parallel
                    full = x["q" if group == "o" else "inter"]
                    n = full.shape[1] // 2
                    xin = full[:, rank * n : (rank + 1) * n]
                else:
                    xin = x["hidden"]
                widths = [getattr(local, {"q": "q_size", "kv": "kv_size", "hidden":
                                          "hidden_size", "inter": "intermediate_size"}[f])
                          for _, f in projs]
                y = torch.zeros(len(rows), sum(widths), dtype=torch.bfloat16)
                batch.apply(layer, group, xin.contiguous(), y)
                out[layer, group] = y
        got[rank] = out
    threads = [threading.Thread(target=rank_run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer in range(cfg.num_layers):
        for group, (_, projs) in GROUPS.items():
            xin = x["hidden"] if group in ("qkv", "gate_up") else x[
                "q" if group == "o" else "inter"]
            want = torch.zeros(len(rows), sum(width[f] for _, f in projs),
                               dtype=torch.bfloat16)
            one.apply(layer, group, xin, want)
            if group in ("o", "down"):  # every rank the whole term, the same on both
                assert torch.equal(got[0][layer, group], got[1][layer, group])
                gap = (got[0][layer, group].float() - want.float()).abs()
                assert (gap <= want.float().abs() * 2**-7 + 1e-3).all(), (layer, group)
                assert not torch.equal(want, torch.zeros_like(want))
            else:  # each rank its rows of every projection: those columns of the whole
                for rank in range(2):
                    cols, start = [], 0
                    for _, f in projs:
                        n = width[f] // 2
                        cols.extend(range(start + rank * n, start + (rank + 1) * n))
                        start += width[f]
                    assert torch.equal(got[rank][layer, group], want[:, cols]), (layer, group)


def test_bf16_adapters_on_two_ranks_take_the_fused_kernel(tmp_path, monkeypatch):
    """A bf16 engine on 2 ranks with adapters runs their terms through the fused kernel on
    every rank (rank 0's row-parallel groups counted here); its first tokens' log
    probabilities are one rank's as closely as the base model's are (the kernel's sums are
    checked above; in bf16 the ranks' partial sums of the base model already move log
    probabilities by tenths and make later tokens differ)."""
    from gpupool import SamplingParams
    from gpupool.kernels import native
    from tests.factories import make_engine, make_peft_adapter, random_prompts

    base = make_tiny_model(tmp_path / "m", "llama")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    path = make_peft_adapter(base, tmp_path / "a", 4, every, seed=3)
    prompts = random_prompts(3, 6, 20, seed=4)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)
    calls, real = [], native.lora_half
    monkeypatch.setattr(native, "lora_half", lambda *a: calls.append(a[5]) or real(*a))
    got = {}
    for world in (1, 2):
        e = make_engine(base, dtype="bfloat16", **({"tensor_parallel": 2, "prefetch": False}
                                                   if world == 2 else {}))
        try:
            e.add_adapter("a", "m", path)
            got[world] = [dict(o.logprobs[0][2]) for o in e.generate(prompts, params,
                                                                      model="a")]
            got[world, "base"] = [dict(o.logprobs[0][2]) for o in e.generate(prompts, params)]
            e.check_integrity()
        finally:
            e.shutdown()
    assert calls and set(calls) == {1, 3}  # o and down: the row-parallel groups
    for one, two, plain in zip(got[1], got[2], got[2, "base"]):
        assert one != plain  # the adapter changed the top tokens
        assert max(one, key=one.get) == max(two, key=two.get), (one, two)
        # as close as the base model's own (2 ranks' bf16 partial sums: up to 0.25 here); a
        # third token within that of the next one may trade places with it (one full-suite
        # run here: {134, 115, 99} on one rank, {134, 115, 152} on two)
        for a, b in ((one, two), (two, one)):
            for t in a:
                assert (abs(a[t] - b[t]) < 0.3 if t in b
                        else a[t] < min(b.values()) + 0.3), (one, two, plain)


def test_a_dead_workers_degree_outlives_its_registry_entry():
    """A group's streams move to a group of its degree, read from what the gateway last saw
    of the dead worker: the first stream to notice the death removes it from the registry,
    so the views the others read next lack it (they once moved to degree 1: "no live worker
    of 1 tensor-parallel rank(s)", seen once in CI)."""
    from types import SimpleNamespace

    from gpupool.cluster.client import RedisClient

    def info(name, tp):
        return SimpleNamespace(name=name, view=lambda alive: SimpleNamespace(tensor_parallel=tp))

    client = RedisClient.__new__(RedisClient)  # the bookkeeping alone, no Redis
    client._views, client._degrees = {}, {}
    client._set_workers([(info("tpA", 2), True), (info("one", 1), True)])
    client._set_workers([(info("one", 1), True)])  # tpA forgotten by another stream
    assert "tpA" not in client._views
    assert client.degree_of("tpA") == 2 and client.degree_of("one") == 1
    assert client.degree_of("never-seen") == 1
