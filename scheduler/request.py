"""A request's integer state inside the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gpupool.messages.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Integer state of one request. ``num_computed_tokens`` tokens have K/V in ``pages``,
    which hold its KV blocks from block ``num_dropped_pages`` on: a model whose every layer
    has a sliding window no longer needs the blocks wholly behind its window, and they are
    released (``Scheduler.release_behind_window``). A model mixing global and windowed layers
    keeps its windowed layers' blocks in ``window_pages`` (blocks of their own size, from
    ``num_dropped_window_pages`` on: those behind the window released) and its global layers'
    in ``pages``."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_total_tokens: int  # prompt + output never exceeds this (max_model_len)
    adapter: str | None = None  # LoRA adapter of ``model`` (the base), or None
    tenant: str | None = None  # who asked: the scheduler shares batch slots between tenants
    output_token_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_dropped_pages: int = 0  # its first KV blocks, released: out of every layer's window
    host_pages: list[int] = field(default_factory=list)  # KV swapped out while preempted
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when a step first ran it (its queue time ends)
    long_rope: bool = False  # its KV uses LongRoPE's long factors (Scheduler.rope_switch)
    last_step: int = -1  # the scheduler step that last ran it (least recently run go first)
    num_delivered: int = 0  # output tokens it arrived with (resumed elsewhere): its SLO clock
    # starts at the first token after them, as a new request's does
    # prefix caching: the chain's root key (model, adapter, salt), None: not cached
    cache_root: bytes | None = None
    page_keys: list[bytes] = field(default_factory=list)  # chain keys of its full pages
    num_indexed_pages: int = 0  # its first pages that are in the prefix index (or tried)
    num_cached_tokens: int = 0  # prompt tokens its first admission took from the cache
    # the windowed layers' KV group (a model mixing them with global layers), as above
    window_pages: list[int] = field(default_factory=list)
    num_dropped_window_pages: int = 0
    host_window_pages: list[int] = field(default_factory=list)
    window_page_keys: list[bytes] = field(default_factory=list)
    num_indexed_window_pages: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def block_table(self) -> list[int]:
        """Its page per KV block, a released block naming page 0 (never read: out of every
        layer's window)."""
        return [0] * self.num_dropped_pages + self.pages if self.num_dropped_pages else self.pages

    @property
    def window_block_table(self) -> list[int]:
        """:attr:`block_table` of the windowed layers' group (empty: the model has none)."""
        dropped = self.num_dropped_window_pages
        return [0] * dropped + self.window_pages if dropped else self.window_pages

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
