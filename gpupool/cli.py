"""Command line: ``gpupool serve`` (the OpenAI-compatible server, one engine),
``gpupool gateway`` and ``gpupool worker`` (the same API over a cluster of engines sharing a
Redis) and ``gpupool generate``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gpupool.default_model import DEFAULT_MODEL


def _engine_threads(requested: int | None = None) -> int:
    """The step loop's CPU threads; this (main) thread then uses one, so its torch work
    (allocating the arena, loading weights) never starts a second OpenMP team beside the
    loop's (see ``LocalEngine._loop``: that costs the step a quarter of its speed)."""
    import torch

    threads = requested or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _generate(args) -> int:
    from gpupool import AdapterError, Engine, ModelLoadError, RequestError, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop=args.stop or None)
    except ValueError as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 2
    engine = Engine(device=args.device, dtype=args.dtype, max_lora_rank=args.max_lora_rank,
                    quantization=args.quantization, threads=_engine_threads())
    try:
        engine.add_model("model", args.model)
        name = "model"
        if args.adapter:
            engine.add_adapter("adapter", "model", args.adapter)
            name = "adapter"
        prompts = args.prompt
        if args.chat:
            tok = engine.tokenizer("model")
            if tok is None or not getattr(tok, "chat_template", None):
                raise RequestError(f"model {args.model!r} has no chat template")
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                               add_generation_prompt=True, tokenize=False)
                       for p in prompts]
            prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = engine.generate(prompts, params, model=name)
    except (ModelLoadError, RequestError, AdapterError) as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()
    if args.json:
        rows = [{"prompt": p, "text": o.text, "token_ids": list(o.token_ids),
                 "finish_reason": o.finish_reason} for p, o in zip(args.prompt, outs)]
        print(json.dumps(rows, ensure_ascii=False))
    else:
        for o in outs:
            print(o.text)
    return 0


def _serve(args) -> int:
    from gpupool.config import load_server_config

    try:
        config = load_server_config(
            args.config, host=args.host, port=args.port, admin_key=args.admin_key,
            model_roots=args.model_root, redis_url=args.redis_url,
            max_queued_requests=args.max_queued_requests, log_level=args.log_level,
            models=args.model, adapters=args.adapter, device=args.device, policy=args.policy,
            reasoning_parser=args.reasoning_parser, task=args.task,
            dtype=args.dtype, quantization=args.quantization,
            tensor_parallel=args.tensor_parallel,
            metrics_key=args.metrics_key, public_metrics=args.public_metrics or None,
            require_auth=args.require_auth or None,
            default_model=args.command == "serve")
        if args.command == "gateway" and not config.redis_url:
            raise ValueError("gateway needs --redis-url (the cluster's Redis)")
    except ValueError as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("gpupool").setLevel(config.log_level.upper())
    from gpupool import AdapterError, ModelLoadError, RequestError
    from gpupool.api.server import serve

    try:
        if args.command == "gateway":
            from gpupool.cluster.client import RedisClient
            from gpupool.config import Config

            engine_config = Config.from_env(**config.engine)
            client = RedisClient(config.redis_url, str(engine_config.home),
                                 migration_limit=args.migration_limit,
                                 outage_limit_s=args.outage_limit_s,
                                 policy=config.engine.get("policy", "token"),
                                 default_slo=(engine_config.scheduler.ttft_ms,
                                              engine_config.scheduler.tbt_ms))
        else:
            from gpupool.llm import local_client

            config.engine.setdefault("threads", _engine_threads())
            client = local_client(config)
        serve(config, client)
    except redis_errors() as e:
        where = redact(config.redis_url) if config.redis_url else "the embedded server"
        print(f"gpupool: error: Redis at {where}: {redact(e)}", file=sys.stderr)
        return 1
    except (ModelLoadError, RequestError, AdapterError, ValueError, OSError) as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 1
    return 0


def redis_errors() -> tuple:
    """Redis's errors (redis is imported only by the commands that use it)."""
    import redis

    return (redis.RedisError,)


def redact(text) -> str:
    """``text`` with every Redis URL's password replaced (errors and logs show no secret)."""
    from gpupool.cluster.conn import redact as _redact

    return _redact(str(text))


def _secret(value: str | None, file: str | None, env: str) -> str | None:
    """A secret from its flag, else the file its ``--...-file`` flag names (stripped), else
    the environment (``config.worker_secrets``; flags are visible to every local user in
    ps)."""
    if value:
        return value
    if file:
        with open(file) as f:
            return f.read().strip() or None
    from gpupool.config import worker_secrets

    return worker_secrets()[env]


def _worker(args) -> int:
    import tomllib

    from gpupool.config import Config
    from gpupool.worker import run_worker

    logging.getLogger("gpupool").setLevel((args.log_level or "info").upper())
    url = None
    try:
        engine = {}
        if args.config:
            with open(args.config, "rb") as f:
                engine = dict(tomllib.load(f).get("engine", {}) or {})
        for key in ("device", "dtype", "policy", "quantization", "tensor_parallel"):
            if getattr(args, key) is not None:
                engine[key] = getattr(args, key)
        engine["threads"] = _engine_threads(args.threads or engine.get("threads"))
        url = _secret(args.redis_url, args.redis_url_file, "redis_url")
        if not url:
            raise ValueError("worker needs the cluster's Redis: --redis-url-file, "
                             "GPUPOOL_REDIS_URL or --redis-url")
        metrics_key = _secret(args.metrics_key, args.metrics_key_file, "metrics_key")
        if args.metrics_port is not None and not (metrics_key or args.public_metrics):
            raise ValueError("--metrics-port needs a metrics key (--metrics-key-file, "
                             "GPUPOOL_METRICS_KEY or --metrics-key) or --public-metrics")
        run_worker(url, args.name, Config.from_env(**engine),
                   args.model_root or (), args.heartbeat_s, args.ttl_s, args.grace_s,
                   args.metrics_port, metrics_key, args.metrics_host)
    except redis_errors() as e:
        print(f"gpupool: error: Redis at {redact(url)}: {redact(e)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:
        print(f"gpupool: error: {e}", file=sys.stderr)
        return 1
    return 0


DTYPES = ["auto", "float32", "bfloat16", "float16"]
QUANTIZATIONS = ["none", "int8", "int4", "int4-g32", "int4-g64", "int4-g128"]
TP_HELP = ("shard every model over N ranks: this process and N - 1 others on this host (CPU, "
           "gloo; default 1); under torchrun --nproc-per-node N, its N processes")
QUANT_HELP = ("int8: store the linear layers and lm_head int8 with one scale per row "
              "(half bf16's bytes); int4: the linear layers 4-bit with a float32 scale and "
              "offset per group of 32 columns (the head int8), int4-g64/int4-g128 for larger "
              "groups (default none)")


def _http_args(s) -> None:
    """The flags of the HTTP server (``serve`` and ``gateway``)."""
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--config", default=None, help="TOML file: models, adapters, tenants, ...")
    s.add_argument("--model", action="append", metavar="NAME=PATH",
                   help=f"serve a model folder (repeatable; default {DEFAULT_MODEL}=smollm2)")
    s.add_argument("--adapter", action="append", metavar="NAME=BASE:PATH",
                   help="serve a PEFT LoRA adapter of a served base model (repeatable)")
    s.add_argument("--reasoning-parser", default=None,
                   choices=["qwen3", "deepseek_r1", "gpt_oss"],
                   help="the --model models (or the default) are thinking models: their "
                        "<think> text (gpt_oss: harmony's analysis channel) goes out as "
                        "reasoning_content")
    s.add_argument("--task", default=None, choices=["generate", "embed"],
                   help="embed: the --model models (or the default) serve /v1/embeddings "
                        "instead of completions (default generate)")
    s.add_argument("--admin-key", default=None, help="enables the admin API (/admin/...)")
    s.add_argument("--model-root", action="append", metavar="DIR",
                   help="folder the admin API may load models and adapters from (repeatable)")
    s.add_argument("--redis-url", default=None,
                   help="external Redis for state (default: embedded, under the data dir)")
    s.add_argument("--policy", choices=["token", "request", "fcfs"], default=None)
    s.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    s.add_argument("--dtype", default=None, choices=DTYPES,
                   help="auto (default: bf16 on a CPU that computes it natively, else "
                        "float32; a GPU: the model's dtype)")
    s.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help=QUANT_HELP)
    s.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help=TP_HELP)
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="unfinished requests beyond this are refused with 503 (default 1024)")
    s.add_argument("--metrics-key", default=None,
                   help="once tenants exist, /metrics needs this key or the admin key")
    s.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics to anyone, even with tenants")
    s.add_argument("--require-auth", action="store_true",
                   help="OpenAI routes need a tenant key even before the first tenant exists "
                        "(a server that has had tenants needs them anyway, even if its state "
                        "store comes back empty)")
    s.add_argument("--log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpupool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    _http_args(s)
    s.set_defaults(func=_serve)
    gw = sub.add_parser("gateway", help="the same HTTP API over a cluster of workers (Redis)")
    _http_args(gw)
    gw.add_argument("--migration-limit", type=int, default=3,
                    help="most times one request is moved after its worker dies (default 3)")
    gw.add_argument("--outage-limit-s", type=float, default=30.0,
                    help="streams pause while Redis is unavailable, and end with an error "
                         "past this many seconds (default 30)")
    gw.set_defaults(func=_serve)
    w = sub.add_parser("worker", help="one engine serving a cluster through Redis")
    w.add_argument("--redis-url", default=None,
                   help="the cluster's Redis (redis:// or rediss://; visible in ps: prefer "
                        "--redis-url-file or GPUPOOL_REDIS_URL)")
    w.add_argument("--redis-url-file", default=None, help="a file holding the Redis URL")
    w.add_argument("--name", default=None, help="unique worker name (default host-pid)")
    w.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    w.add_argument("--dtype", default=None, choices=DTYPES, help="auto (default), ...")
    w.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANT_HELP)
    w.add_argument("--tensor-parallel", type=int, default=None, metavar="N", help=TP_HELP)
    w.add_argument("--policy", choices=["token", "request", "fcfs"], default=None)
    w.add_argument("--config", default=None, help="TOML file whose [engine] table sizes the pool")
    w.add_argument("--model-root", action="append", metavar="DIR",
                   help="folder this worker may load models and adapters from (repeatable)")
    w.add_argument("--heartbeat-s", type=float, default=0.5)
    w.add_argument("--ttl-s", type=float, default=3.0,
                   help="a worker whose heartbeat is this old is dead (a lost node)")
    w.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM, time to finish running requests before exiting")
    w.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    w.add_argument("--metrics-port", type=int, default=None,
                   help="serve the engine's Prometheus metrics on this port (/metrics)")
    w.add_argument("--metrics-host", default="0.0.0.0")
    w.add_argument("--metrics-key", default=None,
                   help="bearer key /metrics needs (required with --metrics-port unless "
                        "--public-metrics; visible in ps: prefer --metrics-key-file or "
                        "GPUPOOL_METRICS_KEY)")
    w.add_argument("--metrics-key-file", default=None, help="a file holding the metrics key")
    w.add_argument("--public-metrics", action="store_true")
    w.add_argument("--log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug"])
    w.set_defaults(func=_worker)
    g = sub.add_parser("generate", help="complete prompts with one model and print them")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, or {DEFAULT_MODEL!r} (default) for SmolLM2-135M")
    g.add_argument("--adapter", help="PEFT LoRA adapter folder to apply to every prompt")
    g.add_argument("--max-lora-rank", type=int, default=64)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true",
                   help="print a JSON list of {prompt, text, token_ids, finish_reason}")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto (bf16 on a CPU that computes it natively, else float32)")
    g.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANT_HELP)
    g.set_defaults(func=_generate)
    from gpupool.admin_cli import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "command", None) in ("serve", "worker"):
        from gpupool.engine import tp

        try:
            launched = tp.torchrun_rank()
            if launched is not None and args.tensor_parallel != launched[1]:
                raise ValueError(f"torchrun started {launched[1]} processes: run "
                                 f"'{args.command} --tensor-parallel {launched[1]}' under it "
                                 "(each process a rank)")
        except ValueError as e:  # every rank says so and exits: none waits for the others
            print(f"gpupool: error: {e}", file=sys.stderr)
            return 2
        if launched is not None and launched[0] > 0:  # torchrun's other ranks follow rank 0
            tp.follow_torchrun()
            return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
