"""The messages between a client and an engine: plain frozen dataclasses of ints, floats,
strings and tuples (no tensors, no tokenizer), so they cross a thread, a process or a machine
as they are (``gpupool.messages.codec`` turns them into JSON-safe dicts and back).

A request's life: the front end sends an :class:`EngineRequest` (prompt token ids; the text
side stays with the front end), the engine answers with :class:`OutputDelta` messages (new
token ids from ``index`` on) until one is final; :class:`Abort` ends it early. Admin commands
(:class:`AddModel`, :class:`RemoveModel`, :class:`AddAdapter`, :class:`RemoveAdapter`) change
what the engine serves; :class:`Stats` is a snapshot of its pool for operators.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

from gpupool.messages.params import SamplingParams

# one generated token's log-probability: (token id, logprob, ((id, logprob), ...) of the
# most likely alternatives) from the model's distribution before temperature and filters
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


def random_seed() -> int:
    """A seed for a request that gave none (recorded on it, so it can be resumed)."""
    return secrets.randbits(63)


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate. ``model``: a base model or an adapter name; ``tenant``: who
    asks (batch slots are shared fairly between tenants); ``cache_salt``: see below.
    ``delivered_token_ids``: output
    tokens a previous engine already delivered (a resumed request); they stay output tokens
    (they count towards ``max_tokens``, penalties and the sampling index), and generation
    continues after them exactly as the uninterrupted request would have. ``params.seed`` is
    always set: an unseeded request gets a random one here, recorded on the request.

    The engine reads only the token-level parts of ``params`` (stop strings are the front
    end's: it aborts the request when one appears)."""

    request_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant: str | None = None
    delivered_token_ids: tuple[int, ...] = ()
    # prefix cache namespace beside model and adapter: requests with different salts never
    # share cached KV (the front end puts the tenant here unless its cache is shared)
    cache_salt: str | None = None
    # one delta when the request ends (every output token in it) instead of one a step: for
    # a caller that reads only the final output (Engine.generate without stop strings; vLLM's
    # FINAL_ONLY output kind). Spares the engine thread a message a token and the consumer
    # its wake-ups, which on a small CPU run beside the step
    final_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "delivered_token_ids", tuple(self.delivered_token_ids))
        if self.params.seed is None:
            object.__setattr__(self, "params",
                               dataclasses.replace(self.params, seed=random_seed()))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # every output token, delivered ones of a resumed request included
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    queue_s: float = 0.0  # from its arrival at the engine to the first step that ran it
    preemptions: int = 0  # times the engine preempted it


@dataclass(frozen=True)
class OutputDelta:
    """New output of one request: ``token_ids`` are output tokens ``index``,
    ``index + 1``, ...; a receiver that already has some drops them by index. The final
    delta has ``finish_reason`` ("stop", "length" or "abort"), ``usage``, and ``error`` when
    the request failed."""

    request_id: str
    index: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when asked for
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop token id (or EOS) that finished it
    usage: Usage | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (known once it runs)
    # with params.prompt_logprobs, once (on the first delta with tokens): per prompt token
    # (token id, logprob, top alternatives, its rank in the vocabulary), None for the first
    prompt_logprobs: tuple | None = None
    embedding: tuple[float, ...] | None = None  # params.pooling: the pooled vector, at the end

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class AddModel:
    """Load the model folder ``path`` (or "smollm2") as ``name``; SLOs, ``dtype`` (auto,
    float32, bfloat16, float16) and ``quantization`` ("int8", "none") default to the
    engine's."""

    name: str
    path: str
    ttft_ms: float | None = None
    tbt_ms: float | None = None
    dtype: str | None = None
    quantization: str | None = None


@dataclass(frozen=True)
class RemoveModel:
    """New requests fail at once; running ones finish, then the model is dropped."""

    name: str


@dataclass(frozen=True)
class AddAdapter:
    """Serve the PEFT LoRA folder ``path`` as ``name`` on the loaded base ``base``;
    ``replace``: the adapter ``name`` exists and gets these weights (vLLM's load_inplace:
    its running requests finish on the old ones, new ones get the new)."""

    name: str
    base: str
    path: str
    replace: bool = False


@dataclass(frozen=True)
class RemoveAdapter:
    name: str


AdminCommand = AddModel | RemoveModel | AddAdapter | RemoveAdapter


@dataclass(frozen=True)
class ModelInfo:
    """What the front end needs to know of a servable name: its base, its limits and where
    its tokenizer lives."""

    name: str
    base: str  # the base model (== name for a base model)
    adapter: str | None  # the adapter (== name), or None for a base model
    folder: str  # the base model's folder (tokenizer, chat template)
    vocab_size: int
    context_limit: int  # most tokens (prompt + output) one request may hold
    eos_token_ids: tuple[int, ...] = ()
    ttft_ms: float | None = None  # the base model's SLOs, where the client knows them
    tbt_ms: float | None = None


@dataclass(frozen=True)
class Stats:
    """A snapshot of an engine's pool (plain values: see ``Engine.stats`` for the keys)."""

    device: str
    policy: str
    arena: dict
    kv_pages: dict
    swaps: dict
    resident_models: tuple[str, ...]
    models: dict
    adapters: dict
    requests: int
    workers: tuple[dict, ...] = ()  # a cluster's workers (a gateway's client fills it)
    cluster: dict = field(default_factory=dict)  # a cluster's counters
    recent_swaps: tuple[dict, ...] = ()  # the last residency changes, newest last

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resident_models"] = list(self.resident_models)
        d["recent_swaps"] = list(self.recent_swaps)
        if not self.workers and not self.cluster:  # one engine: the shape it always had
            del d["workers"], d["cluster"]
        else:
            d["workers"] = list(self.workers)
        return d


MESSAGES = (EngineRequest, Usage, OutputDelta, Abort, AddModel, RemoveModel, AddAdapter,
            RemoveAdapter, ModelInfo, Stats, SamplingParams)
