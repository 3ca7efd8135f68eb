"""The tensors of one forward pass over a flattened batch.

Decode rows come first (one token per sequence), then prefill chunks:

    input_ids  | d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 |
               |<- num_decode ->|<-- prefill chunks -->|
    logits_indices: rows whose next token is sampled (each decode row; the last row of a
    prefill chunk that reaches the end of its sequence), in increasing order: as many as
    there are rows means every row, in order (the model then skips the gather)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchRow:
    """What the engine asks of one sequence in a step (integers only): compute the K/V of
    ``token_ids`` at positions ``start``, ``start + 1``, ... into ``pages`` (the sequence's
    whole page list), and return logits for the last one if ``samples``. Decode rows (one
    token past a cached context) come before prefill chunks."""

    token_ids: list[int]
    start: int
    pages: list[int]
    is_decode: bool
    samples: bool
    adapter: str | None = None
    all_logits: bool = False  # logits for every token of the row (prompt logprobs), in order
    tenant: str | None = None  # whose request (its adapter's device slot is charged to it)
    hidden: bool = False  # the final norm's output of its rows instead of logits (pooling)
    rope_long: bool = False  # LongRoPE's long factors (a sequence past the model's switch)
    # a model mixing global and windowed layers: ``pages`` are the global layers', these the
    # windowed layers' (their own block size; a block released behind the window: page 0)
    window_pages: list[int] | None = None


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    slot_pages: torch.Tensor  # [T] long: page receiving each token's K/V
    slot_offsets: torch.Tensor  # [T] long: slot within that page
    num_decode: int
    decode_block_tables: torch.Tensor  # [num_decode, M] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32, including the new token
    prefill_block_tables: torch.Tensor  # [S, M] int32
    prefill_cu_seqlens: torch.Tensor  # [S + 1] int32: query rows, relative to num_decode
    prefill_context_lens: torch.Tensor  # [S] int32: cached prefix + chunk
    logits_indices: torch.Tensor  # [R] long
    # the decode rows' longest and shortest context (plain ints: every layer's attention
    # would otherwise read them back from the tensor, a device sync each on a GPU)
    decode_max_len: int = 0
    decode_min_len: int = 0
    # rows with ``hidden``: the logits_indices positions that sample and those that pool
    # (None: every one samples)
    pooling: tuple[torch.Tensor, torch.Tensor] | None = None
    # a model mixing global and windowed layers: the batch its windowed layers see (these
    # fields but the slots and block tables, which are their pages'); None otherwise
    window_group: ForwardBatch | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def sampled_rows(self, h: torch.Tensor) -> torch.Tensor:
        """The rows of ``h`` [T, ...] that logits are computed for: ``h`` itself when that is
        every row (a decode step; an index op costs ~10 us on a small CPU)."""
        if self.logits_indices.shape[0] == h.shape[0]:
            return h
        return h[self.logits_indices]

    @property
    def num_prefill_seqs(self) -> int:
        return self.prefill_context_lens.shape[0]
