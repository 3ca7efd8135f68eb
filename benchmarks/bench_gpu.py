"""On a CUDA GPU: the engine's correctness checks and its speed against the memory bound.

Needs no network and no model download: the models are random, with SmolLM2-135M's shapes
(``--shape smollm2``) or a 1B Llama's (``llama1b``), built with transformers in a temporary
folder. In one run:
  bandwidth     a device-to-device copy (GB/s of bytes read) and a bf16 matmul's TFLOP/s;
  kernels       per weight shape and row count: cuBLAS bf16 (F.linear), the Triton int8
                kernel (kernels/int8.py) and the dequantizing int8 reference, in microseconds
                and GB/s of weight bytes read (triton.testing.do_bench, median);
  parity        greedy tokens of the engine on CUDA against transformers on CUDA (fp32 and
                bf16, tiny random Llama and Qwen2 configs): the share of identical tokens;
  decode        the engine's decode tokens/s at each batch size per variant (bf16 with and
                without CUDA graphs, bf16+int8) against transformers' generate in bf16 (same
                prompts, 64 new tokens), and the step time as a multiple of the bound
                (weight bytes / copy bandwidth);
  swap          switching the weight region between two models: the engine's copy against a
                raw pinned host-to-device copy of the same bytes;
  experts       a mixture layer's experts (Qwen3-30B-A3B's shape) through Triton's grouped
                GEMMs (kernels/moe.py) against the loop over experts, and its bound.
Prints one JSON object (also written to --out). Usage:
  python3 benchmarks/bench_gpu.py [--shape smollm2] [--out gpu.json] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import load_tests_package  # noqa: E402

load_tests_package()

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    tie_word_embeddings=True),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                    tie_word_embeddings=False),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def cuda_ms(fn, runs: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events), after warm-up."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=max(runs, 50), return_mode="median"))


def bandwidth() -> dict:
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src))
    src = dst = None  # free 4 GiB before the matmul
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = cuda_ms(lambda: a @ a)
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    h2d = cuda_ms(lambda: dev.copy_(host, non_blocking=True))
    return {"copy_read_gb_s": n / ms / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / mm / 1e9,
            "h2d_pinned_gb_s": (1 << 30) / h2d / 1e6,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}


def kernels(shape: dict) -> list[dict]:
    from gpupool.kernels.int8 import linear_int8
    from gpupool.kernels.linear import linear_int8_reference
    from gpupool.models.loader import quantize_rows

    h, i = shape["hidden_size"], shape["intermediate_size"]
    out = []
    for n, k in ((h, h), (i, h), (h, i), (shape["vocab_size"], h), (11008, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, s = quantize_rows(w.float(), torch.bfloat16)
        q, s = q.cuda(), s.cuda()
        for rows in (1, 16, 256):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = cuda_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            t_int8 = cuda_ms(lambda x=x, q=q, s=s: linear_int8(x, q, s))
            t_ref = cuda_ms(lambda x=x, q=q, s=s: linear_int8_reference(x, q, s))
            err = (linear_int8(x, q, s).float() - linear_int8_reference(x, q, s).float()).abs()
            out.append({"n": n, "k": k, "rows": rows, "bf16_us": t_bf16 * 1e3,
                        "int8_triton_us": t_int8 * 1e3, "int8_reference_us": t_ref * 1e3,
                        "bf16_weight_gb_s": 2 * n * k / t_bf16 / 1e6,
                        "int8_weight_gb_s": n * k / t_int8 / 1e6,
                        "int8_vs_bf16": t_bf16 / t_int8,
                        "max_abs_err_vs_reference": float(err.max())})
            log("kernel", out[-1])
    return out


def experts(copy_gb_s: float, timer=None, device: str = "cuda",
            shape=(2048, 768, 128, 8), row_counts=(1, 16, 256),
            dtype=torch.bfloat16) -> list[dict]:
    """A mixture layer's experts (Qwen3-30B-A3B's: hidden 2048, 768 wide, 128 experts, 8 a
    token; bf16; the other arguments: a smoke run on CPU, interpreted, in float32): Triton's
    grouped GEMMs (kernels/moe.py) against the model's loop of two
    products a touched expert, per row count; the touched experts' bytes over the copy
    bandwidth as the bound; the largest difference between the two in units of the output."""
    from gpupool.kernels import moe, reference

    timer = timer or cuda_ms
    hidden, inter, num, k = shape
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the weights made on the device (1.2 GB in bf16)
    slab = torch.randn(num * 3 * inter * hidden, device=device, dtype=dtype).div_(hidden**0.5)
    per = 3 * inter * hidden
    gate_up = [slab[e * per : e * per + 2 * inter * hidden].view(2 * inter, hidden)
               for e in range(num)]
    down = [slab[e * per + 2 * inter * hidden : (e + 1) * per].view(hidden, inter)
            for e in range(num)]
    products = moe.product(gate_up), moe.product(down)
    act = reference.silu_mul
    out = []
    for rows in row_counts:
        h = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
        logits = torch.randn(rows, num, generator=g).to(device)
        top, idx = torch.topk(torch.softmax(logits, -1), k)
        top = top.to(dtype)

        def loop(h=h, idx=idx, top=top):
            order, at, place = reference.expert_order(idx)
            xs, ws = h.index_select(0, at), top.reshape(-1).index_select(0, order)
            parts, start = [], 0
            for e, n in enumerate(torch.bincount(idx.reshape(-1), minlength=num).tolist()):
                if n:
                    y = act(torch.nn.functional.linear(xs[start : start + n], gate_up[e]))
                    parts.append(torch.nn.functional.linear(y, down[e])
                                 * ws[start : start + n, None])
                    start += n
            return reference.sum_in_expert_order(torch.cat(parts), at, place, tuple(idx.shape))

        def grouped(h=h, idx=idx, top=top):
            return moe.experts(h, idx, top, *products, act)

        touched = int(torch.unique(idx).numel())
        bound = touched * per * slab.element_size() / (copy_gb_s * 1e9)
        t_loop, t_grouped = timer(loop), timer(grouped)
        diff = (grouped().float() - loop().float()).abs().max() / loop().float().abs().max()
        out.append({"rows": rows, "experts_touched": touched, "loop_ms": t_loop,
                    "grouped_ms": t_grouped, "grouped_over_loop": t_loop / t_grouped,
                    "bound_ms": bound * 1e3, "grouped_over_bound": t_grouped / (bound * 1e3),
                    "max_rel_diff": float(diff)})
        log("experts", out[-1])
    return out


def tiny_parity(tmp: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from gpupool import Engine, SamplingParams
    from tests.factories import make_tiny_model, random_prompts

    prompts = random_prompts(6, 4, 30, seed=3)
    out = []
    for variant in ("llama", "qwen2"):
        folder = make_tiny_model(tmp / variant, variant)
        for dtype in ("float32", "bfloat16"):
            model = AutoModelForCausalLM.from_pretrained(str(folder),
                                                         dtype=getattr(torch, dtype)).cuda()
            want = []
            for ids in prompts:
                x = torch.tensor([ids], device="cuda")
                with torch.no_grad():
                    y = model.generate(x, max_new_tokens=16, do_sample=False,
                                       attention_mask=torch.ones_like(x), pad_token_id=0)
                want.append(y[0, len(ids):].tolist())
            e = Engine(device="cuda", dtype=dtype, kv_cache_bytes=64 << 20,
                       kv_page_bytes=16 << 10)
            try:
                e.add_model("m", folder)
                got = [list(o.token_ids) for o in e.generate(
                    prompts, SamplingParams(max_tokens=16, temperature=0), model="m")]
                e.check_integrity()
            finally:
                e.shutdown()
            same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
            total = sum(len(w) for w in want)
            first = sum(g[:1] == w[:1] for g, w in zip(got, want))
            out.append({"variant": variant, "dtype": dtype, "identical_tokens": same / total,
                        "identical_first_tokens": f"{first}/{len(prompts)}",
                        "identical_sequences": sum(g == w for g, w in zip(got, want))})
            log("parity", out[-1])
    return out


def make_shaped_model(folder: Path, shape: dict) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(max_position_embeddings=2048, eos_token_id=2,
                                   bos_token_id=1, pad_token_id=0, **shape)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    return folder


def decode(folder: Path, copy_gb_s: float, runs: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from gpupool import Engine, SamplingParams
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout

    g = torch.Generator().manual_seed(0)
    out = []
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).cuda()
    for quant, graphs in ((None, True), (None, False), ("int8", True)):
        nbytes = build_layout(ModelConfig.from_folder(folder), torch.bfloat16, quant).num_bytes
        e = Engine(device="cuda", dtype="bfloat16", quantization=quant,
                   kv_cache_bytes=4 << 30, cuda_graphs=graphs)
        try:
            e.add_model("m", folder)
            for bs in (1, 16, 64):
                prompts = [torch.randint(3, 30000, (24,), generator=g).tolist()
                           for _ in range(bs)]
                p64 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
                p1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
                e.generate(prompts, p64, model="m")  # warm-up
                t64, t1 = [], []
                for _ in range(runs):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    e.generate(prompts, p64, model="m")
                    t64.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    e.generate(prompts, p1, model="m")
                    t1.append(time.perf_counter() - t)
                step = (statistics.median(t64) - statistics.median(t1)) / 63
                x = torch.tensor(prompts, device="cuda")
                gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False,
                           attention_mask=torch.ones_like(x), pad_token_id=0)
                with torch.no_grad():
                    hf.generate(x, **gen)
                    th = []
                    for _ in range(runs):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        hf.generate(x, **gen)
                        torch.cuda.synchronize()
                        th.append(time.perf_counter() - t)
                bound = nbytes / (copy_gb_s * 1e9)
                out.append({"quantization": quant or "none", "cuda_graphs": graphs,
                            "batch": bs,
                            "weight_bytes": nbytes,
                            "tok_s": bs * 64 / statistics.median(t64),
                            "transformers_bf16_tok_s": bs * 64 / statistics.median(th),
                            "vs_transformers": statistics.median(th) / statistics.median(t64),
                            "step_ms": step * 1e3, "bound_ms": bound * 1e3,
                            "step_over_bound": step / bound})
                log("decode", out[-1])
        finally:
            e.shutdown()
    return out


def profile(folder: Path, out_dir: Path | None) -> dict:
    """Where a batch-1 bf16 decode step's time goes: torch.profiler over 16 steps; the table
    (top ops by self CPU time) goes to profile.txt beside --out."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gpupool import Engine, SamplingParams

    e = Engine(device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30)
    try:
        e.add_model("m", folder)
        p = SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)
        e.generate([[5, 6, 7, 8]], p, model="m")
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            e.generate([[5, 6, 7, 8]], p, model="m")
            wall = time.perf_counter() - t
    finally:
        e.shutdown()
    events = prof.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=40)
    if out_dir is not None:
        (out_dir / "profile.txt").write_text(table + "\n\n" + events.table(
            sort_by="self_device_time_total", row_limit=25))
    launches = sum(ev.count for ev in events if ev.key in ("cudaLaunchKernel",
                                                           "cuLaunchKernel",
                                                           "cudaLaunchKernelExC"))
    syncs = {ev.key: ev.count for ev in events
             if "Synchronize" in ev.key or ev.key in ("cudaMemcpyAsync", "aten::item",
                                                      "aten::_local_scalar_dense")}
    device_us = sum(getattr(ev, "self_device_time_total", 0) for ev in events
                    if ev.device_type == torch.autograd.DeviceType.CUDA)
    return {"wall_s_17_tokens": wall, "kernel_launches_per_token": launches / 17,
            "sync_like_calls": syncs, "gpu_busy_ms_per_token": device_us / 17 / 1e3,
            "wall_ms_per_token": wall / 17 * 1e3}


def swap(folder: Path, runs: int) -> dict:
    from gpupool import Engine, SamplingParams
    from gpupool.models.config import ModelConfig
    from gpupool.models.loader import build_layout

    nbytes = build_layout(ModelConfig.from_folder(folder), torch.bfloat16, None).num_bytes
    e = Engine(device="cuda", dtype="bfloat16", weight_bytes=nbytes, kv_cache_bytes=1 << 30)
    one = SamplingParams(max_tokens=1, temperature=0)
    try:
        e.add_model("a", folder)
        e.add_model("b", folder)
        rec = []
        for _ in range(runs + 1):
            for name in ("a", "b"):
                before = e.local.weights.swap_seconds
                e.generate([[5, 6, 7]], one, model=name)
                rec.append(e.local.weights.swap_seconds - before)
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        raw = cuda_ms(lambda: dev.copy_(host, non_blocking=True)) / 1e3
        return {"weight_bytes": nbytes, "switch_s": statistics.median(rec[2:]),
                "raw_pinned_copy_s": raw, "ratio": statistics.median(rec[2:]) / raw,
                "swaps": e.local.weights.num_swaps}
    finally:
        e.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: needs a CUDA GPU")
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"shape": args.shape}

    def section(name, fn, *a):
        if name in skip:
            return
        t = time.perf_counter()
        try:
            result[name] = fn(*a)
        except Exception as e:  # one section's failure is reported, the others still run
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{name}: {time.perf_counter() - t:.1f} s")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))

    section("bandwidth", bandwidth)
    copy = result.get("bandwidth", {}).get("copy_read_gb_s", 4000.0)
    section("kernels", kernels, SHAPES[args.shape])
    section("experts", experts, copy)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        section("parity", tiny_parity, tmp)
        folder = make_shaped_model(tmp / args.shape, SHAPES[args.shape])
        section("profile", profile, folder, args.out.parent if args.out else None)
        section("decode", decode, folder, copy, args.runs)
        section("swap", swap, folder, args.runs)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
