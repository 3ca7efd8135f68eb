"""``Engine``: the face for Python users: a :class:`LocalEngine` (token ids in, deltas out)
wrapped with the text side.

    engine = Engine(device="cpu")
    engine.add_model("smollm2", "smollm2")
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))

Text goes through :mod:`gpupool.frontend.text` (tokenise, detokenise, stop strings); the
engine is reached only through its client protocol (:class:`LocalClient`), as the HTTP layer
reaches it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from gpupool.config import Config
from gpupool.default_model import DEFAULT_MODEL
from gpupool.engine.core import Sink
from gpupool.engine.local import LocalClient, LocalEngine
from gpupool.frontend.text import RequestOutput, TextStream, tokenize
from gpupool.messages.errors import RequestError
from gpupool.messages.params import SamplingParams
from gpupool.messages.types import EngineRequest, ModelInfo
from gpupool.scheduler.slo import SLO

__all__ = ["Engine", "RequestOutput"]


class Engine:
    """Many models, one KV pool, continuous batching; thread-safe public methods.

    Text in and out; the models, the pool and the step loop are ``self.local``'s (a
    :class:`LocalEngine`), whose operator methods are repeated here by name."""

    def __init__(self, device: str = "auto", config: Config | None = None, **overrides):
        self.local = LocalEngine(device, config, **overrides)

    # ---- the wrapped engine's operator surface, unchanged -----------------------------------
    @property
    def config(self) -> Config:
        return self.local.config

    @property
    def device(self):
        return self.local.device

    def add_model(self, name: str, path: str | Path = DEFAULT_MODEL, slo: SLO | None = None,
                  dtype: str | None = None, quantization: str | None = None) -> None:
        """See :meth:`LocalEngine.add_model`."""
        self.local.add_model(name, path, slo, dtype, quantization)

    def remove_model(self, name: str) -> None:
        self.local.remove_model(name)

    def add_adapter(self, name: str, base: str, path: str | Path,
                    replace: bool = False) -> None:
        self.local.add_adapter(name, base, path, replace)

    def remove_adapter(self, name: str) -> None:
        self.local.remove_adapter(name)

    @property
    def models(self) -> list[str]:
        return self.local.models

    @property
    def adapters(self) -> dict[str, str]:
        return self.local.adapters

    def slo(self, ttft_ms: float | None, tbt_ms: float | None) -> SLO | None:
        return self.local.slo(ttft_ms, tbt_ms)

    def model_info(self, name: str) -> ModelInfo | None:
        return self.local.model_info(name)

    def tokenizer(self, model: str):
        return self.local.tokenizer(model)

    def stats(self) -> dict:
        return self.local.stats()

    def num_unfinished(self) -> int:
        return self.local.num_unfinished()

    def abort(self, request_id: str) -> None:
        self.local.abort(request_id)

    def reset_prefix_cache(self) -> int:
        return self.local.reset_prefix_cache()

    def check_integrity(self) -> None:
        self.local.check_integrity()

    @property
    def alive(self) -> bool:
        return self.local.alive

    def shutdown(self) -> None:
        self.local.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ---- the text side ------------------------------------------------------------------------
    def client(self) -> LocalClient:
        """The engine's client protocol (what ``gpupool serve`` hands the HTTP layer)."""
        return LocalClient(self.local)

    def tokenize(self, model: str, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids for ``model``, checked (RequestError if empty, untokenizable
        or out of the vocabulary)."""
        info = self.model_info(model)
        if info is None:
            raise RequestError(f"model {model!r} is not loaded")
        return tokenize(self.tokenizer(model), prompt, info.vocab_size)

    def _requests(self, prompts, params, model, tenant=None,
                  cache_salt=None) -> list[EngineRequest]:
        names = [model] * len(prompts) if isinstance(model, str) else list(model)
        if len(names) != len(prompts):
            raise RequestError("give one model name, or one per prompt")
        out = []
        for i, (prompt, p, name) in enumerate(zip(prompts, params, names)):
            try:
                ids = self.tokenize(name, prompt)
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
            # generate reads only the final output: one delta at the end, unless stop strings
            # need the text as it grows
            out.append(EngineRequest(self.local.new_request_id(), name, ids, p, tenant,
                                     cache_salt=cache_salt, final_only=not p.stop))
        return out

    def generate(self, prompts: str | list[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 model: str | list[str] | None = None,
                 cache_salt: str | None = None,
                 tenant: str | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one final output per prompt, in order.

        ``model`` names a base model or an adapter, or is a list with one name per prompt,
        so one call can mix bases and adapters. Requests with different ``cache_salt`` never
        share cached prompt KV. ``tenant``: whose requests (tenant-fair scheduling, and the
        per-tenant cap of adapters on the device, ``max_loras_per_tenant``). Every prompt is
        checked before any is queued, so a bad one raises RequestError and nothing of the
        call runs.
        Blocks; from a thread with a running event loop (a notebook) it runs in a helper
        thread.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError("give one SamplingParams, or one per prompt")
        plist = [p or SamplingParams() for p in plist]
        if not isinstance(model, (list, tuple)):
            model = self.local.model_name(model)
        requests = self._requests(prompts, plist, model, tenant, cache_salt=cache_salt)
        tokenizers = {r.model: self.tokenizer(r.model) for r in requests}
        return _run_blocking(self._run_all(requests, tokenizers))

    async def _run_all(self, requests: list[EngineRequest], tokenizers) -> list[RequestOutput]:
        streams = await self.client().submit(requests)
        return list(await asyncio.gather(*(self._final(s, r, tokenizers[r.model])
                                           for s, r in zip(streams, requests))))

    async def _outputs(self, stream, req: EngineRequest, tokenizer):
        """The request's RequestOutput updates. A stop string aborts it in the engine; the
        stream is still read to its final delta, so the engine has let go of the request
        (its pages are free) when the last output is yielded."""
        text = TextStream(req.request_id, req.model, tokenizer, req.prompt_token_ids,
                          req.params)
        final = None
        try:
            async for delta in stream:
                out = text.feed(delta)
                if text.stopped and not stream.done:
                    await stream.aclose()  # the engine's final (abort) delta still comes
                    async for _ in stream.rest():
                        pass
                if out is not None and out.finished:
                    final = out
                elif out is not None:
                    yield out
            if final is not None:
                yield final
        finally:
            await stream.aclose()  # left early: abort (no-op once finished)

    async def _final(self, stream, req, tokenizer) -> RequestOutput:
        last = None
        async for out in self._outputs(stream, req, tokenizer):
            last = out
        return last

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     model: str | None = None, request_id: str | None = None,
                     cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; leaving early aborts the request."""
        name = self.local.model_name(model)
        ids = self.tokenize(name, prompt)
        tokenizer = self.tokenizer(name)
        req = EngineRequest(request_id or self.local.new_request_id(), name, ids,
                            params or SamplingParams(), cache_salt=cache_salt)
        [stream] = await self.client().submit([req])
        agen = self._outputs(stream, req, tokenizer)
        try:
            async for out in agen:
                yield out
        finally:
            await agen.aclose()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    model: str | None = None, request_id: str | None = None,
                    sink: Sink | None = None, tenant: str | None = None) -> str:
        """Queue one request (a string is tokenised); ``sink(OutputDelta)`` is called from
        the engine thread with token-level outputs (no text: stop strings are the text
        side's, so a request with ``stop`` is refused here; use ``generate`` or ``stream``)."""
        if params is not None and params.stop:
            raise RequestError("add_request is token-level: stop strings need the text side "
                               "(generate or stream)")
        name = self.local.model_name(model)
        req = EngineRequest(request_id or self.local.new_request_id(), name,
                            self.tokenize(name, prompt), params or SamplingParams(), tenant)
        return self.local.submit([req], [sink])[0]


def _run_blocking(coro):
    """Run ``coro`` to its end and return its result: in this thread, or in a helper thread
    when this one already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def run():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, name="gpupool-generate")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def local_client(server_config) -> LocalClient:
    """A client over a new in-process engine configured by a ``ServerConfig``'s engine
    table (what ``gpupool serve`` runs)."""
    return LocalClient(LocalEngine(config=Config.from_env(**server_config.engine)))
