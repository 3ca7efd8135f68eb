"""Multi-LoRA throughput on SmolLM2-135M-Instruct: gpupool's mixed-adapter batches vs peft.

--requests (32) requests, 64 new tokens each (exactly: ignore_eos / min_new_tokens), greedy,
over --distinct adapters (request i uses adapter i mod k), rank 16 on all seven projections,
adapters made by peft with random non-zero B; for each of --variants (dtype, +int8: an int8
base, against peft in bf16). peft runs in a separate process (the engine's keeps one torch
thread team, as ``gpupool serve`` does). In the same run:
  gpupool        the engine, one continuous batch mixing the adapters (SGMV path);
  no_lora        the engine on the same prompts with the base model only;
  peft_seq       peft, one adapter at a time (set_adapter, that adapter's requests batched);
  peft_mixed     peft's mixed-adapter batch (generate(..., adapter_names=[...])).
Output tokens/s, median of --runs timed runs (the engine also gets one warm-up run).

Many adapters (``--adapters 64,512,2000 --zipf 1``, issue 31's workload): rank-8 adapters on
q/k/v/o, generated once into a cache folder (``<home>/bench-adapters``: one peft adapter, the
others its config with seeded random weights); per count, one engine with the default
adapter settings (``--slots`` sets max_loras_on_device) registers them all (seconds, RSS
growth, host cache bytes), then --requests (64) requests of 32 greedy tokens, each request's
adapter drawn by Zipf(s) over the count (once untimed: each adapter's first read), then
--runs timed runs of the base-only batch of the same prompts and of the adapters' batch,
alternated in the same engine: the median of the per-run ratios (and their range), the
batch's distinct adapters, the adapters' device copies and pages of the KV pool.

Cold adapter (``--cold``): time to first token of a one-request batch whose adapter was
never used and whose file was dropped from the page cache (``posix_fadvise(DONTNEED)``),
against the bound of issue 31: the adapter's bytes over the disk read rate measured in the
same run (a 64 MB file written, synced, dropped, read back) plus one step (the same request
with its adapter warm: the median of 3 just before each cold one, as speed drifts here),
--runs adapters each; the median of the per-adapter ratios and their range. The first cold
adapter of a file layout also builds its packing plan (tens of ms, once a process).
Usage: python3 benchmarks/bench_lora.py [--json] [--runs 3] [--requests 8 --distinct 4]
       python3 benchmarks/bench_lora.py --adapters 64,512,2000 --zipf 1 [--slots 64]
           [--adapter-wait-ms 0,500]
       python3 benchmarks/bench_lora.py --cold [--runs 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import prompts  # noqa: E402
from common import (  # noqa: E402
    cpu_flags,
    emit,
    engine_threads,
    in_subprocess,
    median_seconds,
    sweep,
    variants,
)

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402

NEW_TOKENS, RANK = 64, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapters(folder: str, out: str, n: int) -> dict[str, str]:
    """``make_adapters`` for ``in_subprocess``: the adapters' folders by name."""
    _, paths = make_adapters(Path(folder), Path(out), n)
    return {name: str(p) for name, p in paths.items()}


def make_adapters(folder: Path, out: Path, n: int):
    """n peft adapters saved under out/<name>; returns the PeftModel holding them all."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(out), selected_adapters=[f"a{i}" for i in range(n)])
    paths = {f"a{i}": out / f"a{i}" for i in range(n)}
    return model.eval(), paths


def peft_figures(folder: str, paths: dict, dtype: str, n: int, distinct: list[int],
                 runs: int) -> dict:
    """peft's seconds for the workload per adapter count: one adapter at a time, and its
    mixed-adapter batch (run by ``in_subprocess``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    names = sorted(paths)
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.to(getattr(torch, dtype)).eval()
    texts = prompts(n)

    def generate(batch, adapters=None):
        enc = tok(batch, return_tensors="pt", padding=True)
        kw = {"adapter_names": adapters} if adapters else {}
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, pad_token_id=tok.pad_token_id, **kw)

    out = {}
    for k in distinct:
        adapters = [f"a{i % k}" for i in range(n)]

        def seq(adapters=adapters):
            for a in sorted(set(adapters)):
                model.set_adapter(a)
                generate([t for t, m in zip(texts, adapters) if m == a])

        out[f"seq{k}"] = median_seconds(seq, runs, warmup=False)
        out[f"mixed{k}"] = median_seconds(lambda a=adapters: generate(texts, a), runs,
                                          warmup=False)
    return out


MANY_RANK, MANY_TARGETS, MANY_TOKENS = 8, ["q_proj", "k_proj", "v_proj", "o_proj"], 32


def many_adapter_folders(folder: Path, n: int) -> list[Path]:
    """``n`` rank-8 q/k/v/o adapters of the model in ``folder``, made once into
    ``<home>/bench-adapters``: one by peft (its config and tensor names), the others that
    config with seeded random weights (A ~ N(0, 1/sqrt(fan_in)), B ~ N(0, 0.02))."""
    import json

    from safetensors.torch import load_file, save_file

    root = default_home() / "bench-adapters" / f"r{MANY_RANK}-qkvo"
    first = root / "a0"
    if not (first / "adapter_model.safetensors").exists():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        cfg = LoraConfig(r=MANY_RANK, lora_alpha=2 * MANY_RANK, target_modules=MANY_TARGETS,
                         init_lora_weights=False)
        get_peft_model(base, cfg).save_pretrained(str(first))
    shapes = {k: v.shape for k, v in load_file(str(first / "adapter_model.safetensors")).items()}
    config = json.loads((first / "adapter_config.json").read_text())
    folders = []
    for i in range(n):
        out = root / f"a{i}"
        if not (out / "adapter_model.safetensors").exists():
            g = torch.Generator().manual_seed(i)
            out.mkdir(parents=True, exist_ok=True)
            tensors = {k: (torch.randn(shape, generator=g)
                           * (0.02 if "lora_B" in k else shape[-1] ** -0.5)).half()
                       for k, shape in shapes.items()}
            save_file(tensors, str(out / "adapter_model.safetensors"))
            (out / "adapter_config.json").write_text(json.dumps(config))
        folders.append(out)
    return folders


def zipf_names(n: int, count: int, s: float, seed: int = 0) -> list[str]:
    """``count`` adapter names drawn by Zipf(s) over a0 .. a{n-1} (a0 the most popular)."""
    weights = torch.tensor([1.0 / (k + 1) ** s for k in range(n)])
    picks = torch.multinomial(weights, count, replacement=True,
                              generator=torch.Generator().manual_seed(seed))
    return [f"a{int(i)}" for i in picks]


def many_adapters(args, threads: int) -> dict:
    import psutil

    folder = ensure_default_model(default_home())
    counts = [int(x) for x in args.adapters.split(",")]
    paths = many_adapter_folders(folder, max(counts))
    n = args.requests
    texts = prompts(n)
    params = SamplingParams(max_tokens=MANY_TOKENS, temperature=0, ignore_eos=True)
    total = n * MANY_TOKENS
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
              "threads": threads, "requests": n, "new_tokens": MANY_TOKENS,
              "rank": MANY_RANK, "targets": "q/k/v/o", "zipf": args.zipf, "runs": args.runs,
              "slots": args.slots or "default"}
    proc = psutil.Process()
    extra = {"max_loras_on_device": args.slots} if args.slots else {}
    waits = [float(w) for w in args.adapter_wait_ms.split(",")]
    for count, wait in [(c, w) for c in counts for w in waits]:
        engine = Engine(device="cpu", dtype="bfloat16", threads=threads,
                        enable_prefix_caching=False, adapter_wait_ms=wait, **extra)
        engine.add_model("base", folder)
        engine.generate(texts[:4], params, model="base")  # warm: native build, packing
        rss = proc.memory_info().rss
        t = time.perf_counter()
        for i in range(count):
            engine.add_adapter(f"a{i}", "base", str(paths[i]))
        key = count if len(waits) == 1 else f"{count}_wait{wait:g}"
        result[f"register_s_{key}"] = round(time.perf_counter() - t, 2)
        result[f"register_rss_mb_{key}"] = round((proc.memory_info().rss - rss) / 2**20, 1)
        paged = engine.local.core.workers["base"].adapter_pages
        result[f"host_cache_bytes_{key}"] = paged.host_bytes
        names = zipf_names(count, n, args.zipf)
        result[f"distinct_{key}"] = len(set(names))
        engine.generate(texts, params, model=names)  # first use: each adapter read once
        # the base-only batch and the adapters' in the same engine, alternated run by run
        base_s, ours = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            engine.generate(texts, params, model="base")
            base_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.generate(texts, params, model=names)
            ours.append(time.perf_counter() - t)
        ratios = sorted(b / o for b, o in zip(base_s, ours))
        result[f"base_tok_s_{key}"] = round(total / statistics.median(base_s), 1)
        result[f"tok_s_{key}"] = round(total / statistics.median(ours), 1)
        result[f"of_base_{key}"] = round(statistics.median(ratios), 3)
        result[f"of_base_range_{key}"] = f"{ratios[0]:.3f}-{ratios[-1]:.3f}"
        pool = engine.local.kv.pages
        result[f"device_copies_{key}"] = len(paged.resident)
        result[f"adapter_pages_{key}"] = pool.num_adapter_pages
        result[f"pool_pages_{key}"] = pool.num_pages
        result[f"adapter_loads_{key}"] = paged.num_loads
        result[f"adapter_evictions_{key}"] = pool.num_adapters_evicted
        engine.shutdown()
    return result


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_rate(folder: Path, nbytes: int = 64 << 20) -> float:
    """Bytes a second of a cold sequential read on ``folder``'s disk (a file written,
    synced and dropped from the page cache, then read back)."""
    path = folder / "gpupool-read-rate.bin"
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
        _drop_from_page_cache(path)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        return nbytes / (time.perf_counter() - t)
    finally:
        path.unlink(missing_ok=True)


def cold_adapter(args, threads: int) -> dict:
    """Time to first token with a cold adapter against the disk-read bound (module doc)."""
    folder = ensure_default_model(default_home())
    paths = many_adapter_folders(folder, args.runs + 1)
    text = prompts(1)
    first = SamplingParams(max_tokens=1, temperature=0)
    engine = Engine(device="cpu", dtype="bfloat16", threads=threads,
                    enable_prefix_caching=False)
    engine.add_model("base", folder)
    for i, path in enumerate(paths):
        engine.add_adapter(f"a{i}", "base", str(path))
    for _ in range(2):  # warm: a0's host copy and pages, the kernels
        engine.generate(text, first, model="a0")
    files = [p / "adapter_model.safetensors" for p in paths]
    rate = disk_read_rate(paths[0].parent)
    size = files[1].stat().st_size
    warm, cold, ratios = [], [], []
    for i in range(1, args.runs + 1):  # each cold request beside warm ones (speed drifts)
        w = median_seconds(lambda: engine.generate(text, first, model="a0"), 3, warmup=False)
        _drop_from_page_cache(files[i])
        t = time.perf_counter()
        engine.generate(text, first, model=f"a{i}")
        cold.append(time.perf_counter() - t)
        warm.append(w)
        ratios.append(cold[-1] / (size / rate + w))
    engine.shutdown()
    mid = statistics.median
    return {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
            "threads": threads, "rank": MANY_RANK, "targets": "q/k/v/o", "runs": args.runs,
            "adapter_bytes": size, "disk_read_mb_s": round(rate / 1e6, 1),
            "warm_ttft_ms": round(mid(warm) * 1e3, 1), "cold_ttft_ms": round(mid(cold) * 1e3, 1),
            "cold_ttft_ms_each": [round(c * 1e3, 1) for c in cold],
            "bound_ms": round((size / rate + mid(warm)) * 1e3, 1),
            "cold_over_bound": round(mid(ratios), 3),
            "cold_over_bound_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--distinct", default="1,4,32")
    ap.add_argument("--variants", default="float32,bfloat16,bfloat16+int8")
    ap.add_argument("--adapters", default=None,
                    help="many-adapter mode: registered adapter counts, e.g. 64,512,2000")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=None, help="max_loras_on_device (many mode)")
    ap.add_argument("--adapter-wait-ms", default="500",
                    help="many mode: adapter_wait_ms values, each its own engine (0,500 "
                         "compares the scheduler without and with its preference)")
    ap.add_argument("--cold", action="store_true",
                    help="time to first token with an adapter cold on disk")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = engine_threads()  # before any torch work in this process
    if args.cold:
        emit(cold_adapter(args, threads), args.json)
        return
    if args.adapters:
        args.requests = args.requests or 64
        emit(many_adapters(args, threads), args.json)
        return
    args.requests = args.requests or 32
    n = args.requests
    folder = ensure_default_model(default_home())
    texts = prompts(n)
    tmp = Path(tempfile.mkdtemp(prefix="gpupool-bench-lora-"))
    distinct = [int(x) for x in args.distinct.split(",")]
    paths = in_subprocess(save_adapters, str(folder), str(tmp), max(distinct))
    ours_params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    total = n * NEW_TOKENS
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
              "threads": threads, "requests": n,
              "new_tokens": NEW_TOKENS, "rank": RANK, "targets": "all 7 projections",
              "runs": args.runs}
    todo = variants(args.variants)
    with sweep(len(todo) * (2 + len(distinct)), "bench_lora") as bar:
        for label, dtype, quant in todo:
            bar.note(f"{label} peft")
            peft_dtype = dtype
            result[f"{label}_peft_dtype"] = peft_dtype
            ref = in_subprocess(peft_figures, str(folder), paths, peft_dtype, n, distinct,
                                args.runs)
            bar.update()
            engine = Engine(device="cpu", dtype=dtype, quantization=quant, max_lora_rank=RANK,
                            max_loras_on_device=max(distinct), threads=threads,
                            enable_prefix_caching=False)
            engine.add_model("base", folder)
            for name, path in paths.items():
                engine.add_adapter(name, "base", path)
            bar.note(f"{label} no adapter")
            base_s = median_seconds(lambda e=engine: e.generate(texts, ours_params, model="base"),
                                    args.runs)
            result[f"{label}_no_lora_tok_s"] = round(total / base_s, 1)
            bar.update()
            for k in distinct:
                bar.note(f"{label} {k} adapters")
                names = [f"a{i % k}" for i in range(n)]
                ours = median_seconds(
                    lambda names=names, e=engine: e.generate(texts, ours_params, model=names),
                    args.runs)
                p = f"{label}_"
                result[f"{p}gpupool_tok_s_{k}"] = round(total / ours, 1)
                result[f"{p}peft_sequential_tok_s_{k}"] = round(total / ref[f"seq{k}"], 1)
                result[f"{p}peft_mixed_tok_s_{k}"] = round(total / ref[f"mixed{k}"], 1)
                result[f"{p}ratio_vs_peft_sequential_{k}"] = round(ref[f"seq{k}"] / ours, 3)
                result[f"{p}ratio_vs_peft_mixed_{k}"] = round(ref[f"mixed{k}"] / ours, 3)
                result[f"{p}ratio_vs_no_lora_{k}"] = round(base_s / ours, 3)
                bar.update()
            engine.shutdown()
    emit(result, args.json)

if __name__ == "__main__":
    main()
