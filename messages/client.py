"""The one way in and out of an engine. The HTTP layer, ``Engine.generate`` and the
benchmarks talk to an engine only through this protocol; ``gpupool.engine.local.LocalClient``
runs the engine in this process (its own thread), and a remote client can put the same
messages on a wire.

Errors are :mod:`gpupool.messages.errors` classes: ``RequestError`` for a request that can
never run (nothing of the batch is queued), ``ModelLoadError`` / ``AdapterError`` for admin
commands that fail (nothing is changed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from gpupool.messages.types import AdminCommand, EngineRequest, ModelInfo, OutputDelta, Stats


@runtime_checkable
class OutputStream(Protocol):
    """The outputs of one submitted request, in order, ending with a final delta. Closing it
    (``aclose``) before the final delta aborts the request."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[OutputDelta]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    async def submit(self, requests: Sequence[EngineRequest]) -> list[OutputStream]:
        """Queue every request, or none (RequestError names the first bad one); one output
        stream per request, in order."""
        ...

    async def abort(self, request_id: str) -> None:
        """Finish a request now (reason ``abort``); unknown or finished ids are ignored."""
        ...

    async def command(self, cmd: AdminCommand) -> None:
        """Add or remove a model or an adapter."""
        ...

    async def stats(self) -> Stats: ...

    def model_info(self, name: str) -> ModelInfo | None:
        """What ``name`` is, if it takes requests now (a snapshot; never blocks on a step)."""
        ...

    def holds_name(self, name: str) -> bool:
        """Whether a model or adapter of this name is loaded, one being removed included."""
        ...

    def tokenizer(self, model: str) -> Any:
        """The tokenizer of ``model``'s base (a transformers tokenizer: ``__call__``,
        ``decode``, ``apply_chat_template``), or None when it has none."""
        ...

    def num_unfinished(self) -> int:
        """Requests queued or running (a snapshot)."""
        ...

    @property
    def alive(self) -> bool: ...

    @property
    def home(self) -> str:
        """The engine's state folder (models converted on first use, Redis data)."""
        ...

    def close(self) -> None: ...


class QueueStream:
    """An ``OutputStream`` fed through an asyncio queue (``put``): what an in-process client
    hands out. ``abort(request_id)`` is awaited when the stream is closed before its end."""

    def __init__(self, request_id: str, abort: Callable[[str], Awaitable[None]]):
        self.request_id = request_id
        self._abort = abort
        self.queue: asyncio.Queue[OutputDelta] = asyncio.Queue()
        self.done = False  # iteration over (final delta read, or closed)
        self.ended = False  # the final delta was read

    def put(self, delta: OutputDelta) -> None:
        self.queue.put_nowait(delta)

    def __aiter__(self):
        return self

    async def __anext__(self) -> OutputDelta:
        if self.done:
            raise StopAsyncIteration
        delta = await self.queue.get()
        self.done = self.done or delta.finished
        self.ended = self.ended or delta.finished
        return delta

    async def rest(self):
        """The deltas still to come after ``aclose``, up to the final one."""
        while not self.ended:
            delta = await self.queue.get()
            self.ended = delta.finished
            yield delta

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            await self._abort(self.request_id)
