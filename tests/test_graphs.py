"""CUDA graphs of decode steps (models/graphs.py): replays give the tokens eager steps give.

Needs a CUDA GPU: skipped without one (CI has none; run on a GPU with scripts/gpu_check.sh).
On CPU only the switch is checked: an engine on CPU never makes graphs."""

import dataclasses

import pytest
import torch

from gpupool import Engine, SamplingParams
from gpupool.config import Config
from tests.factories import make_engine, make_peft_adapter, random_prompts

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CUDA graphs)")


def test_cpu_engines_make_no_graphs_and_the_switch_reads_the_environment(tiny_models,
                                                                         monkeypatch):
    e = make_engine(tiny_models("llama"))
    try:
        assert e.local.core.workers["m"].graphs is None
    finally:
        e.shutdown()
    monkeypatch.setenv("GPUPOOL_CUDA_GRAPHS", "0")
    assert Config.from_env().cuda_graphs is False
    monkeypatch.setenv("GPUPOOL_CUDA_GRAPHS", "1")
    assert Config.from_env().cuda_graphs is True


def _run(folders, adapter, dtype: str, graphs: bool, weight_bytes: int | None = None):
    e = Engine(device="cuda", dtype=dtype, kv_cache_bytes=64 << 20, kv_page_bytes=16 << 10,
               cuda_graphs=graphs, weight_bytes=weight_bytes, max_lora_rank=8)
    try:
        for name, folder in folders.items():
            e.add_model(name, folder)
        e.add_adapter("ad", "llama", adapter)
        prompts = random_prompts(7, 3, 30, seed=11)
        # different lengths: rows finish at different steps, so the batch size changes
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                  for n in (3, 17, 9, 24, 5, 12, 20)]
        models = ["llama", "qwen2", "llama", "llama", "qwen2", "ad", "llama"]
        out = [list(o.token_ids) for o in e.generate(prompts, params, model=models)]
        sampled = [list(o.token_ids) for o in e.generate(
            prompts[:4], SamplingParams(max_tokens=10, temperature=0.9, seed=3,
                                        ignore_eos=True), model="llama")]
        e.check_integrity()
        stats = {n: (w.graphs.num_captures, w.graphs.num_replays, w.graphs.enabled)
                 for n, w in e.local.core.workers.items() if w.graphs is not None}
        return out, sampled, stats
    finally:
        e.shutdown()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replays_give_the_eager_tokens(tiny_models, tmp_path, dtype):
    folders = {"llama": tiny_models("llama"), "qwen2": tiny_models("qwen2")}
    adapter = make_peft_adapter(folders["llama"], tmp_path / "ad", 4, ["q_proj", "v_proj"])
    eager, eager_sampled, none = _run(folders, adapter, dtype, graphs=False)
    assert none == {}
    got, got_sampled, stats = _run(folders, adapter, dtype, graphs=True)
    assert got == eager and got_sampled == eager_sampled
    for name, (captures, replays, enabled) in stats.items():
        assert enabled and captures >= 2 and replays > captures, (name, stats)


@pytest.mark.gpu
@needs_cuda
def test_a_model_with_two_kv_groups_replays_the_eager_tokens(tiny_models):
    """gpt-oss, its windowed layer's pages a KV group of their own (released behind its
    window of 6): graphs' greedy tokens are the eager steps' over prompts past the window."""
    prompts = random_prompts(5, 8, 30, seed=12)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    out = {}
    for graphs in (False, True):
        e = Engine(device="cuda", dtype="float32", kv_cache_bytes=16 << 20,
                   kv_page_bytes=2 << 10, cuda_graphs=graphs)
        try:
            e.add_model("m", tiny_models("gpt_oss"))
            out[graphs] = [list(o.token_ids) for o in e.generate(prompts, params)]
            w = e.local.core.workers["m"]
            assert w.window_group is not None
            assert e.local.core.scheduler.num_released_pages > 0
            assert not graphs or w.graphs.num_replays > 0
        finally:
            e.shutdown()
    assert out[True] == out[False]


@pytest.mark.gpu
@needs_cuda
def test_graphs_follow_the_weights_through_swaps(tiny_models, tmp_path):
    """A weight region that holds one model: every switch copies the other in, maybe at
    another address; the graphs must never replay stale weights."""
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout

    folders = {"llama": tiny_models("llama"), "qwen2": tiny_models("qwen2")}
    adapter = make_peft_adapter(folders["llama"], tmp_path / "ad", 4, ["q_proj", "v_proj"])
    one = max(build_layout(ModelConfig.from_folder(f), torch.float32).num_bytes
              for f in folders.values())
    eager, _, _ = _run(folders, adapter, "float32", graphs=False, weight_bytes=one)
    got, _, stats = _run(folders, adapter, "float32", graphs=True, weight_bytes=one)
    assert got == eager
    assert all(enabled for _, _, enabled in stats.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the Triton kernels interpreted on "
                    "CPU tensors; on a GPU the replay tests above cover the static inputs")
@pytest.mark.parametrize("variant", ["qwen2", "gpt_oss"])
def test_the_static_inputs_give_the_eager_logits(tiny_models, variant):
    """What a graph replays, run eagerly on CPU: the static batch filled from a step's rows
    (block tables padded to the model's longest context) gives build_batch's logits, with
    the Triton kernels (interpreted here) that a CUDA graph captures. gpt-oss: its windowed
    layer's pages a KV group of their own (their slots and tables static inputs too; a
    released block's entry page 0)."""
    from gpupool.models.batch import BatchRow
    from gpupool.models.graphs import DecodeGraphs, _Graph

    e = make_engine(tiny_models(variant), kernels="triton")  # what a CUDA graph captures
    try:
        w = e.local.core.workers["m"]
        w.make_resident(frozenset({"m"}))
        bt, wbt = w.block_tokens, w.window_group[0] if w.window_group else 0
        assert (variant == "gpt_oss") == bool(wbt)
        graphs = DecodeGraphs("m", w.model, w.kv_view, bt, torch.device("cpu"), wbt)
        g = torch.Generator().manual_seed(0)
        for view in w.kv_view if wbt else (w.kv_view,):  # any cached context
            view.copy_(torch.randn(view.shape, generator=g))

        def window(start, first):  # the windowed layers' pages: blocks behind the window 0
            if not wbt:
                return None
            pages = list(range(first, first + start // wbt + 1))
            dead = max(0, start - w.cfg.group_window + 1) // wbt
            return [0] * dead + pages[dead:]

        rows = [BatchRow([7], start, list(range(first, first + start // bt + 1)), True, True,
                         window_pages=window(start, 20 + first))
                for start, first in ((0, 0), (bt + 3, 5), (3 * bt - 1, 9))]
        assert graphs.eligible(rows)
        assert not graphs.eligible([BatchRow([7, 8], 0, [0], False, True)])  # prefill
        assert not graphs.eligible([BatchRow([7], 0, [0], True, True, adapter="a")])
        assert w.model.ops.name == "triton"
        static = _Graph(len(rows), graphs.max_pages, torch.device("cpu"),
                        graphs.max_window_pages)
        graphs._fill(static, rows)
        assert static.batch.decode_block_tables.shape == (3, graphs.max_pages)
        got = w.model.forward(static.batch, w.kv_view, None)
        want = w.model.forward(w.batch(rows), w.kv_view, None)
        assert torch.equal(got, want)
        if wbt:  # the windowed layers read their own pages: other ones give other logits
            moved = [dataclasses.replace(r, window_pages=[p + 1 for p in r.window_pages])
                     for r in rows]
            graphs._fill(static, moved)
            assert not torch.equal(w.model.forward(static.batch, w.kv_view, None), want)
    finally:
        e.shutdown()
