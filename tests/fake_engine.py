"""A fake engine behind the client protocol, in pure Python (no torch, no transformers), so
the HTTP layer can be tested alone and shown to need nothing of the engine.

The "model" is a counter over a character vocabulary: token ids are code points, and each
new token is the previous token + 1 (wrapping inside printable ASCII), or, for a seeded
sampled request, a token drawn from ``random.Random(hash(seed, index))``. So every output is
predictable from the request alone. Each delta carries one token; an ``Abort`` ends the
request with reason "abort". The fake records every request and abort it was sent.
"""

from __future__ import annotations

import asyncio
import random

from gpupool.messages.client import QueueStream
from gpupool.messages.errors import ModelLoadError, RequestError
from gpupool.messages.types import (
    AddAdapter,
    AddModel,
    EngineRequest,
    ModelInfo,
    OutputDelta,
    RemoveAdapter,
    RemoveModel,
    Stats,
    Usage,
)

VOCAB = 128
FIRST, LAST = 32, 126  # printable ASCII: every token decodes to one character
EOS = 3


class CharTokenizer:
    """Token id = code point (below VOCAB); a chat template of ``role: content`` lines."""

    chat_template = "role: content"
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text]
        if any(i >= VOCAB for i in ids):
            raise ValueError("character outside the fake vocabulary")
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < FIRST))

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False,
                            continue_final_message=False, **template_kwargs):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if continue_final_message:
            text = text.removesuffix("\n")
        return text + ("assistant: " if add_generation_prompt else "")


def next_token(req: EngineRequest, index: int, previous: int) -> int:
    """Token ``index`` of the request's output (``previous``: the token before it)."""
    p = req.params
    if p.is_greedy:
        return FIRST + (previous + 1 - FIRST) % (LAST - FIRST + 1)
    return random.Random(p.seed * 1_000_003 + index).randint(FIRST, LAST)


class FakeClient:
    def __init__(self, home: str, models: dict[str, int] | None = None,
                 step_seconds: float = 0.001):
        """``models``: name -> context limit."""
        self._home = home
        self.models = {"fake": 256} if models is None else dict(models)
        self.adapters: dict[str, str] = {}
        self.step_seconds = step_seconds
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self._tasks: dict[str, asyncio.Task] = {}
        self._streams: dict[str, QueueStream] = {}
        self.closed = False

    # ---- requests ---------------------------------------------------------------------------
    async def submit(self, requests):
        for r in requests:
            if self.model_info(r.model) is None:
                raise RequestError(f"model {r.model!r} is not loaded")
            if any(not 0 <= t < VOCAB for t in r.prompt_token_ids):
                raise RequestError(f"prompt token ids must be integers in [0, {VOCAB})")
        streams = []
        for r in requests:
            self.requests.append(r)
            s = QueueStream(r.request_id, self.abort)
            self._streams[r.request_id] = s
            self._tasks[r.request_id] = asyncio.create_task(self._run(r, s))
            streams.append(s)
        return streams

    async def _run(self, req: EngineRequest, stream: QueueStream) -> None:
        p, out = req.params, list(req.delivered_token_ids)
        previous = out[-1] if out else req.prompt_token_ids[-1]
        try:
            while True:
                await asyncio.sleep(self.step_seconds)
                token = next_token(req, len(out), previous)
                out.append(token)
                previous = token
                reason = stop = None
                if token in p.stop_token_ids and len(out) >= p.min_tokens:
                    reason, stop = "stop", token
                elif len(out) >= p.max_tokens:
                    reason = "length"
                stream.put(OutputDelta(
                    req.request_id, len(out) - 1, (token,),
                    logprobs=((token, -0.5, ((token, -0.5),)),) if p.logprobs is not None
                    else None,
                    finish_reason=reason, stop_token=stop,
                    usage=Usage(len(req.prompt_token_ids), len(out)) if reason else None))
                if reason:
                    return
        except asyncio.CancelledError:
            stream.put(OutputDelta(req.request_id, len(out),
                                                finish_reason="abort",
                                                usage=Usage(len(req.prompt_token_ids),
                                                            len(out))))
        finally:
            self._tasks.pop(req.request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    # ---- admin ------------------------------------------------------------------------------
    async def command(self, cmd) -> None:
        if isinstance(cmd, AddModel):
            if cmd.name in self.models:
                raise RequestError(f"model {cmd.name!r} is already loaded")
            if cmd.path == "broken":
                raise ModelLoadError(f"{cmd.path}: model folder does not exist")
            self.models[cmd.name] = 256
        elif isinstance(cmd, RemoveModel):
            self.models.pop(cmd.name)
        elif isinstance(cmd, AddAdapter):
            self.adapters[cmd.name] = cmd.base
        elif isinstance(cmd, RemoveAdapter):
            self.adapters.pop(cmd.name)

    async def stats(self) -> Stats:
        kv = {"page_bytes": 1, "total": 1, "used": 0, "free": 1, "host_total": 0,
              "host_used": 0}
        swaps = dict.fromkeys(("weight_swaps", "weight_bytes", "weight_seconds",
                               "weight_prefetches", "weight_prefetch_hits",
                               "weight_prefetches_wasted", "kv_pages_out", "kv_pages_in",
                               "kv_bytes"), 0)
        arena = {"total_bytes": 0, "weights": {"bytes": 0, "used_bytes": 0},
                 "kv": {"bytes": 0}}
        models = {n: {"resident": True, "weight_bytes": 0, "removing": False, "waiting": 0,
                      "running": 0, "max_loras": 0, "adapter_pages": 0, "resident_adapters": []}
                  for n in self.models}
        return Stats("fake", "token", arena, kv, swaps, tuple(self.models), models,
                     dict(self.adapters), len(self._tasks))

    # ---- what is served ---------------------------------------------------------------------
    def model_info(self, name: str) -> ModelInfo | None:
        if name in self.models:
            return ModelInfo(name, name, None, "/fake", VOCAB, self.models[name], (EOS,))
        if name in self.adapters:
            base = self.adapters[name]
            return ModelInfo(name, base, name, "/fake", VOCAB, self.models[base], (EOS,))
        return None

    def holds_name(self, name: str) -> bool:
        return name in self.models or name in self.adapters

    def tokenizer(self, model: str):
        return CharTokenizer()

    def num_unfinished(self) -> int:
        return len(self._tasks)

    @property
    def alive(self) -> bool:
        return not self.closed

    @property
    def home(self) -> str:
        return self._home

    def close(self) -> None:
        self.closed = True
