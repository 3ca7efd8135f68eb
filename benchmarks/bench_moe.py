"""A mixture of experts against a dense model of the same active parameters (issue 34's MoE
goal: batch-1 decode within 1.5x of the dense model).

Two random SmolLM2-shaped models (hidden 576, 30 layers, 9 heads, 3 KV heads, vocabulary
49152, bf16), made once under ``$GPUPOOL_HOME/bench-moe``: a Mixtral-style mixture of 8
experts of intermediate size 768, 2 a token, and a dense Llama of intermediate size 1536
(the same multiply-adds a token; the mixture holds 4x the MLP weights). Decode tokens/s at
batch 1 and 16 (64 new tokens, greedy) on one engine serving both, interleaved for --rounds
rounds;
medians, ranges and the ratio. Random weights route tokens about uniformly, so a batch of 16
touches every expert: its bound is the mixture's whole weights, not the active ones. The
bound: the weight bytes a step reads (all but the untouched experts) over the read rate of a
plain float32 sum of 512 MB measured in the same run.
--loop-too also times the mixture with its experts run as the model's loop of products (the
path before the one-call native kernel, native.moe_experts) in the same engine, interleaved.
--quantization int4 stores both models' linear layers 4-bit (the bound then counts their
4-bit bytes).
--lora-rank R also times the mixture with every row on one adapter of rank R (random, made
once by peft): ``moe_attn_lora`` on q/k/v/o only (the one-call experts stay), ``moe_lora`` on
q/k/v/o and the experts' gate_up and down weights (peft's target_parameters: the loop over
experts with each expert's terms), interleaved with the rest; each against the base mixture.
Usage: python3 benchmarks/bench_moe.py [--json] [--rounds 3] [--loop-too] [--quantization Q]
  [--lora-rank R]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_flags, emit, engine_threads  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402

SHAPE = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def _make(folder: Path, kind: str) -> Path:
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    if kind == "moe":
        cfg = transformers.MixtralConfig(intermediate_size=768, num_local_experts=8,
                                         num_experts_per_tok=2, **SHAPE)
    else:
        cfg = transformers.LlamaConfig(intermediate_size=1536, **SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    return folder


def _adapter(folder: Path, out: Path, rank: int, experts: bool) -> Path:
    """A random peft adapter of the mixture (made once): q/k/v/o, and with ``experts`` the
    experts' gate_up and down weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    extra = ({"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
             if experts else {})
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **extra)
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


def _decode(engine: Engine, name: str, batch: int, tokens: int = 64) -> float:
    prompts = [[3 + i, 40 + i, 77, 120 + i] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0), model=name)
    start = time.perf_counter()
    engine.generate(prompts, params, model=name)
    return batch * tokens / (time.perf_counter() - start)


@contextlib.contextmanager
def experts_loop(on: bool):
    """The native backend's one-call experts off while ``on`` (the model's loop instead)."""
    from gpupool.kernels.backend import NativeOps, TorchOps

    own = NativeOps.__dict__["experts"]
    if on:
        NativeOps.experts = TorchOps.experts
    try:
        yield
    finally:
        NativeOps.experts = own


def read_rate(nbytes: int = 512 << 20, runs: int = 5) -> float:
    """Bytes a second of a plain read of memory: a float32 buffer summed (the median of
    ``runs``), the raw baseline of the bandwidth bound."""
    import torch

    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def touched_bytes(worker, batch_experts: int) -> int:
    """Weight bytes a decode step reads: everything but the experts no row routes to
    (``batch_experts``: experts touched a layer) and the embedding rows (the head reads the
    tied table whole)."""
    import torch

    cfg = worker.cfg
    expert = sum(sp.numel * torch.empty((), dtype=sp.dtype).element_size()
                 for sp in worker.layout.specs
                 if sp.name.startswith("layers.0.experts.0."))
    return worker.layout.num_bytes - (cfg.num_experts - batch_experts) * expert * cfg.num_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop-too", action="store_true")
    ap.add_argument("--quantization", default=None, help="e.g. int4: both models so")
    ap.add_argument("--lora-rank", type=int, default=0, help="also time adapters of this rank")
    args = ap.parse_args()
    root = default_home() / "bench-moe"
    folders = {k: _make(root / k, k) for k in ("moe", "dense")}
    runs: dict[str, list[float]] = {}
    # one engine serving both (one thread team: a second engine's idle threads spinning
    # beside the measured one's slowed it by half here), rounds interleaved; the weight
    # region holds both, so no swap is timed
    engine = Engine(device="cpu", threads=engine_threads(), enable_prefix_caching=False,
                    quantization=args.quantization)
    try:
        for kind, folder in folders.items():
            engine.add_model(kind, str(folder))
        kinds = list(folders) + (["moe_loop"] if args.loop_too else [])
        if args.lora_rank:
            for name, experts in (("moe_attn_lora", False), ("moe_lora", True)):
                path = _adapter(folders["moe"], root / f"{name}-r{args.lora_rank}",
                                args.lora_rank, experts)
                engine.add_adapter(name, "moe", str(path))
                kinds.append(name)
        for _ in range(args.rounds):
            for batch in (1, 16):
                for kind in kinds:
                    with experts_loop(kind == "moe_loop"):
                        runs.setdefault(f"{kind}_b{batch}", []).append(
                            _decode(engine, kind.removesuffix("_loop"), batch))
        swaps = engine.stats()["swaps"]["weight_swaps"]
        moe = engine.local.core.workers["moe"]
        # batch 1 touches its top-k experts a layer; 16 rows x 2 of 8 (random weights route
        # about uniformly): a given expert is missed with probability (6/8)^16 = 1%: all
        sizes = {1: touched_bytes(moe, moe.cfg.experts_per_tok),
                 16: touched_bytes(moe, moe.cfg.num_experts)}
        rate = read_rate()
    finally:
        engine.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"cpu": cpu_flags(), "rounds": args.rounds, "weight_swaps": swaps,
              "quantization": args.quantization,
              "tok_s": {k: [round(med[k], 1), round(min(v), 1), round(max(v), 1)]
                        for k, v in runs.items()},
              "moe_over_dense_step": {b: round(med[f"dense_b{b}"] / med[f"moe_b{b}"], 2)
                                      for b in (1, 16)},
              "read_gb_s": round(rate / 1e9, 1),
              "moe_touched_mb": {b: round(n / 1e6, 1) for b, n in sizes.items()},
              "moe_bound_ms": {b: round(n / rate * 1e3, 2) for b, n in sizes.items()},
              "moe_step_ms": {b: round(b / med[f"moe_b{b}"] * 1e3, 2) for b in (1, 16)},
              "moe_step_over_bound": {b: round(b / med[f"moe_b{b}"] / (n / rate), 2)
                                      for b, n in sizes.items()}}
    for name in ("moe_attn_lora", "moe_lora"):
        if f"{name}_b1" in med:
            result[f"{name}_over_base_step"] = {
                b: round(med[f"moe_b{b}"] / med[f"{name}_b{b}"], 2) for b in (1, 16)}
    if args.loop_too:
        result["loop_step_over_bound"] = {b: round(b / med[f"moe_loop_b{b}"] / (n / rate), 2)
                                          for b, n in sizes.items()}
        result["loop_over_one_call_step"] = {
            b: round(med[f"moe_b{b}"] / med[f"moe_loop_b{b}"], 2) for b in (1, 16)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
