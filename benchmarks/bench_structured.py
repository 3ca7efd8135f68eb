"""What structured output (response_format json_schema, xgrammar) costs per decoded token,
SmolLM2-135M-Instruct, against the same batch decoding freely.

Batches of 1 and 16 chat prompts generate exactly --tokens tokens each, greedy: the
constrained batch under a schema whose string field must be longer than that (so none ends
early), the free one with ignore_eos. Medians of --runs; the ratio is constrained time over
free time (1.0: free). dtype auto (bf16 on a CPU that computes it natively). In the same run.
Usage: python3 benchmarks/bench_structured.py [--json] [--runs 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import prompts  # noqa: E402
from common import cpu_flags, emit, engine_threads, median_seconds  # noqa: E402

from gpupool import Engine, SamplingParams  # noqa: E402
from gpupool.config import default_home  # noqa: E402
from gpupool.default_model import ensure_default_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 1000, "maxLength": 2000},
    "year": {"type": "integer"}}, "required": ["title", "year"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = engine_threads()
    folder = ensure_default_model(default_home())
    engine = Engine(device="cpu", threads=threads, enable_prefix_caching=False)
    engine.add_model("m", folder)
    tok = engine.tokenizer("m")
    n = args.tokens
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "cpu": cpu_flags(),
              "tokens": n, "runs": args.runs}
    free = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=n, temperature=0,
                                 structured=("json_schema", json.dumps(SCHEMA)))
    for bs in (1, 16):
        chats = [tok.apply_chat_template([{"role": "user", "content": f"A book as JSON: {p}"}],
                                         add_generation_prompt=True, tokenize=False)
                 for p in prompts(bs)]

        def run(params, chats=chats):
            outs = engine.generate(chats, params)
            assert all(len(o.token_ids) == n for o in outs), [len(o.token_ids) for o in outs]

        t_free = median_seconds(lambda: run(free), args.runs)
        t_json = median_seconds(lambda: run(constrained), args.runs)
        result[f"free_ms_per_step_bs{bs}"] = round(t_free / n * 1e3, 2)
        result[f"json_schema_ms_per_step_bs{bs}"] = round(t_json / n * 1e3, 2)
        result[f"constrained_over_free_bs{bs}"] = round(t_json / t_free, 3)
    engine.shutdown()
    emit(result, args.json)


if __name__ == "__main__":
    main()
