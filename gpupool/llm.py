"""``Engine``: the face for Python users, a :class:`LocalEngine` with the text side.

    engine = Engine(device="cpu")
    engine.add_model("smollm2", "smollm2")
    outs = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))

Text goes through :mod:`gpupool.frontend.text` (tokenise, detokenise, stop strings); the
engine is reached only through its client protocol (:class:`LocalClient`), as the HTTP layer
reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from gpupool.engine.core import Sink
from gpupool.engine.local import LocalClient, LocalEngine
from gpupool.frontend.text import RequestOutput, TextStream, tokenize
from gpupool.messages.errors import RequestError
from gpupool.messages.params import SamplingParams
from gpupool.messages.types import EngineRequest

__all__ = ["Engine", "RequestOutput"]


class Engine(LocalEngine):
    """Many models, one KV pool, continuous batching; thread-safe public methods."""

    def client(self) -> LocalClient:
        """The engine's client protocol (what ``gpupool serve`` hands the HTTP layer)."""
        return LocalClient(self)

    def tokenize(self, model: str, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids for ``model``, checked (RequestError if empty, untokenizable
        or out of the vocabulary)."""
        info = self.model_info(model)
        if info is None:
            raise RequestError(f"model {model!r} is not loaded")
        return tokenize(self.tokenizer(model), prompt, info.vocab_size)

    def _requests(self, prompts, params, model, tenant=None) -> list[EngineRequest]:
        names = [model] * len(prompts) if isinstance(model, str) else list(model)
        if len(names) != len(prompts):
            raise RequestError("give one model name, or one per prompt")
        out = []
        for i, (prompt, p, name) in enumerate(zip(prompts, params, names)):
            try:
                ids = self.tokenize(name, prompt)
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
            out.append(EngineRequest(self.new_request_id(), name, ids, p, tenant))
        return out

    def generate(self, prompts: str | list[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 model: str | list[str] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one final output per prompt, in order.

        ``model`` names a base model or an adapter, or is a list with one name per prompt,
        so one call can mix bases and adapters. Every prompt is checked before any is
        queued, so a bad one raises RequestError and nothing of the call runs. Not from a
        running event loop (use ``stream`` there).
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
            model = self._model_name(model)
        requests = self._requests(prompts, plist, model)
        return asyncio.run(self._run_all(requests))

    async def _run_all(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        client = self.client()
        streams = await client.submit(requests)
        return list(await asyncio.gather(*(self._final(client, s, r)
                                           for s, r in zip(streams, requests))))

    async def _outputs(self, client: LocalClient, stream, req: EngineRequest):
        """The request's RequestOutput updates; a stop string aborts it in the engine."""
        text = TextStream(req.request_id, req.model, self.tokenizer(req.model),
                          req.prompt_token_ids, req.params)
        try:
            async for delta in stream:
                out = text.feed(delta)
                if text.stopped:
                    await stream.aclose()
                if out is not None:
                    yield out
                if text.finished:
                    return
        finally:
            await stream.aclose()  # left early: abort (no-op once finished)

    async def _final(self, client, stream, req) -> RequestOutput:
        last = None
        async for out in self._outputs(client, stream, req):
            last = out
        return last

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     model: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; leaving early aborts the request."""
        name = self._model_name(model)
        ids = self.tokenize(name, prompt)
        req = EngineRequest(request_id or self.new_request_id(), name, ids,
                            params or SamplingParams())
        client = self.client()
        [stream] = await client.submit([req])
        agen = self._outputs(client, stream, req)
        try:
            async for out in agen:
                yield out
        finally:
            await agen.aclose()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    model: str | None = None, request_id: str | None = None,
                    sink: Sink | None = None, tenant: str | None = None) -> str:
        """Queue one request (a string is tokenised); ``sink(OutputDelta)`` is called from
        the engine thread with token-level outputs."""
        name = self._model_name(model)
        return super().add_request(self.tokenize(name, prompt), params, name, request_id,
                                   sink, tenant)


def local_client(server_config) -> LocalClient:
    """A client over a new in-process engine configured by a ``ServerConfig``'s engine
    table (what ``gpupool serve`` runs)."""
    from gpupool.config import Config

    return Engine(config=Config.from_env(**server_config.engine)).client()
