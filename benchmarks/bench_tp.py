"""Tensor parallelism on this CPU: 2 ranks of one thread each against one rank of two threads.

A random model of SmolLM2-135M's size but 8 attention heads of 64 and 2 KV heads (SmolLM2's 9
and 3 do not split over 2 ranks), 30 layers, made once into ``<home>/bench-tp-model``; bf16
greedy decode of 64 tokens at batch 1 and 16 (``--batch-sizes``), interleaved rounds, the
median of ``--runs``. Baselines in the same run: the one-rank engine as it runs (the native
whole-step decode call) and on the per-op path (``same_path``); two ranks as they run (each
decode step one native call per rank, its all-reduces inside through the shared-memory
exchange) and with rank 0 on the per-op path (``two_ranks_per_op``: rank 1 keeps its call;
the ranks meet at every exchange, so the slower path sets the pace). Rank 0's time per step
in the collectives it makes from Python is measured (all of them on the per-op path; the
embedding's all-reduce and the logits' gather around the native call). Goal (issue 35): 2
ranks >= 0.8x one rank's tokens/s.
Each configuration runs in its own process (``--rounds`` of them, interleaved).
``--lora-rank R``: every row on one adapter of rank R on all seven projections (random, made
once by peft into ``<home>/bench-tp-lora-rR``), in every configuration: the fused LoRA kernel
on each rank (the row-parallel groups' shrinks summed over the ranks), against one rank's.
Usage: python3 benchmarks/bench_tp.py [--json] [--runs 3] [--rounds 2] [--batch-sizes 1,16]
  [--lora-rank R]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402

NEW_TOKENS = 64


def model_folder() -> Path:
    folder = default_home() / "bench-tp-model"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def lora_folder(rank: int) -> Path:
    """A random rank-``rank`` peft adapter of the model on all seven projections."""
    folder = default_home() / f"bench-tp-lora-r{rank}"
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(model_folder()), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    get_peft_model(base, cfg).save_pretrained(str(folder))
    return folder


def _timed(engine: Engine, batch: int, model: str = "m") -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    prompts = [[1 + (i * 7 + j) % 400 for j in range(16)] for i in range(batch)]
    start = time.perf_counter()
    engine.generate(prompts, params, model=model)
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def _collective_timer(engine: Engine) -> dict:
    """Wrap rank 0's all-reduce and gather with a clock: seconds spent, and calls."""
    tp = engine.local.core.workers["m"].model.tp
    spent = {"s": 0.0, "calls": 0}
    for name in ("all_reduce", "gather_columns"):
        real = getattr(tp, name)

        def timed(t, _real=real):
            start = time.perf_counter()
            out = _real(t)
            spent["s"] += time.perf_counter() - start
            spent["calls"] += 1
            return out

        setattr(tp, name, timed)
    return spent


CONFIGS = {  # name: (engine options, whole-step decode call kept)
    "one_rank": ({"threads": 2}, True),
    "one_rank_same_path": ({"threads": 2}, False),
    "two_ranks": ({"threads": 1, "tensor_parallel": 2}, True),
    "two_ranks_per_op": ({"threads": 1, "tensor_parallel": 2}, False),
}


def run_config(name: str, sizes: list[int], runs: int, lora_rank: int = 0) -> dict:
    """One configuration in this process (its own: two engines' idle thread teams in one
    process slow each other): tokens/s per batch size, and rank 0's collectives per step."""
    options, whole = CONFIGS[name]
    engine = Engine(device="cpu", dtype="bfloat16", **options,
                    **({"max_lora_rank": lora_rank} if lora_rank else {}))
    out: dict[str, list[float]] = {}
    target = "a" if lora_rank else "m"
    try:
        engine.add_model("m", model_folder())
        if lora_rank:
            engine.add_adapter("a", "m", str(lora_folder(lora_rank)))
        _timed(engine, 1, target)  # warm-up, weights (and the adapter) resident
        model = engine.local.core.workers["m"].model
        if not whole:
            model.ops.decode_step = lambda *a: None  # the per-op path the ranks take
        spent = _collective_timer(engine) if model.tp is not None else None
        for batch in sizes:
            for _ in range(runs):
                before = dict(spent) if spent else None
                out.setdefault(f"{name}_tok_s_bs{batch}", []).append(
                    _timed(engine, batch, target))
                if spent:
                    out.setdefault(f"{name}_collectives_ms_per_step_bs{batch}", []).append(
                        (spent["s"] - before["s"]) / NEW_TOKENS * 1e3)
    finally:
        engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=3, help="timed runs a configuration a round")
    ap.add_argument("--rounds", type=int, default=2, help="each configuration's processes")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--lora-rank", type=int, default=0, help="every row on an adapter")
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)  # a child's
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.config:
        print(json.dumps(run_config(args.config, sizes, args.runs, args.lora_rank)))
        return
    model_folder()
    if args.lora_rank:
        lora_folder(args.lora_rank)
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved: the machine's drift hits all alike
        for name in CONFIGS:
            child = subprocess.run(
                [sys.executable, "-P", __file__, "--config", name, "--runs", str(args.runs),
                 "--batch-sizes", args.batch_sizes, "--lora-rank", str(args.lora_rank)],
                capture_output=True, text=True, check=True)
            for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items():
                rates.setdefault(k, []).extend(v)
    result = {"model": "random, SmolLM2-sized, 8 heads / 2 KV heads", "dtype": "bfloat16",
              "cpu": cpu_flags(), "new_tokens": NEW_TOKENS, "lora_rank": args.lora_rank,
              "runs": args.runs * args.rounds}
    for k, v in sorted(rates.items()):
        result[k] = round(statistics.median(v), 2)
    for batch in sizes:
        for two in ("two_ranks", "two_ranks_per_op"):
            for base in ("one_rank", "one_rank_same_path"):
                result[f"{two}_vs_{base}_bs{batch}"] = round(
                    result[f"{two}_tok_s_bs{batch}"] / result[f"{base}_tok_s_bs{batch}"], 3)
    emit(result, args.json)


if __name__ == "__main__":
    main()
