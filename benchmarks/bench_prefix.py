"""Prefix caching on a multi-turn chat workload, SmolLM2-135M-Instruct, cache on vs off.

Conversations (--conversations, default 6) share one system prompt of a few hundred tokens;
each belongs to one of 3 tenants (each tenant its own cache namespace, as the server does)
and runs on the base model or one of 2 LoRA adapters (rank 16, made by peft). Every
conversation has 4 to 8 turns; a turn sends the whole history through the chat template
(system, earlier user and assistant turns, the new user message) and generates a 24-token
reply, greedy. All conversations' turn t go at once, turn by turn. In the same run, with the
prefix cache on and off: time to first token per request (median of the first turns, and of
the later ones), total generated tokens/s over the workload, and the cache's hit rate
(prompt tokens found cached / prompt tokens looked up). dtype: auto (bf16 on a CPU that
computes it natively).
Usage: python3 benchmarks/bench_prefix.py [--json] [--conversations 6]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora import save_adapters  # noqa: E402
from common import cpu_flags, emit, engine_threads, in_subprocess  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402

SYSTEM = (
    "You are the support assistant of Northwind Outdoor Supply, a shop that sells tents, "
    "sleeping bags, stoves, rain gear and climbing equipment online and in three stores. "
    "Answer in two or three short sentences. Be friendly and precise. Policies you must "
    "follow: orders ship within two business days from the warehouse in Denver; standard "
    "shipping is free above fifty dollars and costs six dollars below; express shipping costs "
    "eighteen dollars and arrives in two days. Items can be returned within sixty days if "
    "unused, and within thirty days if used but undamaged; sale items are final. Refunds go "
    "to the original payment method within five business days after the return arrives. "
    "Warranty claims for stoves and tents are handled by the manufacturer, and you give the "
    "customer the manufacturer's contact page. Never promise a delivery date for backordered "
    "items. If a customer is angry, apologise once and offer to escalate to a human agent. "
    "Stores are open nine to seven on weekdays and ten to five on weekends. Gift cards never "
    "expire. Price matching applies to identical items from authorised dealers within "
    "fourteen days of purchase. Do not discuss competitors' products beyond price matching."
)
QUESTIONS = [
    "Hi, I ordered a tent yesterday. When will it ship?",
    "How much is express shipping?",
    "Can I return a sleeping bag I used once on a trip?",
    "The stove I bought stopped working. What should I do?",
    "Do you price match?",
    "What are your store hours on Sunday?",
    "My gift card is from 2019. Does it still work?",
    "Thanks, that is all for today.",
]
REPLY_TOKENS = 24


def conversations(n: int) -> list[dict]:
    return [{"tenant": f"tenant{i % 3}", "model": ["base", "a0", "a1"][i % 3],
             "turns": 4 + (i * 3) % 5, "history": [{"role": "system", "content": SYSTEM}]}
            for i in range(n)]


async def run_workload(engine: Engine, convs: list[dict]) -> dict:
    tok = engine.tokenizer("base")
    params = SamplingParams(max_tokens=REPLY_TOKENS, temperature=0, ignore_eos=True)
    first_ttft, later_ttft, generated = [], [], 0

    async def turn(conv: dict, t: int) -> None:
        nonlocal generated
        conv["history"].append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
        text = tok.apply_chat_template(conv["history"], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        start, ttft, last = time.perf_counter(), None, None
        async for out in engine.stream(ids, params, model=conv["model"],
                                       cache_salt=conv["tenant"]):
            if ttft is None and out.token_ids:
                ttft = time.perf_counter() - start
            last = out
        (first_ttft if t == 0 else later_ttft).append(ttft)
        generated += len(last.token_ids)
        conv["history"].append({"role": "assistant", "content": last.text})

    start = time.perf_counter()
    for t in range(max(c["turns"] for c in convs)):
        await asyncio.gather(*(turn(c, t) for c in convs if t < c["turns"]))
    wall = time.perf_counter() - start
    stats = engine.stats()["models"]["base"]
    return {"ttft_first_turn_s": statistics.median(first_ttft),
            "ttft_later_turns_s": statistics.median(later_ttft),
            "tok_s": generated / wall, "requests": len(first_ttft) + len(later_ttft),
            "hit_rate": stats["prefix_cache_hits"] / max(1, stats["prefix_cache_queries"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--conversations", type=int, default=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = engine_threads()  # as gpupool serve: one torch thread team in this process
    folder = ensure_default_model(default_home())
    paths = in_subprocess(save_adapters, str(folder),
                          tempfile.mkdtemp(prefix="gpupool-bench-prefix-"), 2)
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
              "conversations": args.conversations, "reply_tokens": REPLY_TOKENS}
    for caching in (True, False):
        engine = Engine(device="cpu", enable_prefix_caching=caching, max_lora_rank=16,
                        threads=threads)
        engine.add_model("base", folder)
        for name, path in paths.items():
            engine.add_adapter(name, "base", path)
        engine.generate("warm up", SamplingParams(max_tokens=2))
        got = asyncio.run(run_workload(engine, conversations(args.conversations)))
        engine.shutdown()
        label = "cache_on" if caching else "cache_off"
        result[f"{label}_requests"] = got["requests"]
        result[f"{label}_ttft_first_turn_s"] = round(got["ttft_first_turn_s"], 3)
        result[f"{label}_ttft_later_turns_s"] = round(got["ttft_later_turns_s"], 3)
        result[f"{label}_tok_s"] = round(got["tok_s"], 1)
        result[f"{label}_hit_rate"] = round(got["hit_rate"], 3)
    result["later_turns_ttft_speedup"] = round(
        result["cache_off_ttft_later_turns_s"] / result["cache_on_ttft_later_turns_s"], 2)
    result["throughput_ratio"] = round(result["cache_on_tok_s"] / result["cache_off_tok_s"], 2)
    emit(result, args.json)


if __name__ == "__main__":
    main()
