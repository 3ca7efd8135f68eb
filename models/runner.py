"""Build the tensors of one step from the scheduler's integers (the only place that does)."""

from __future__ import annotations

import torch

from gpupool.models.batch import BatchRow, ForwardBatch


def _block_table(rows: list[list[int]], device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32,
                        device=device)


def build_batch(rows: list[BatchRow], block_tokens: int, device) -> ForwardBatch:
    """The step's tensors from its rows (decode rows first)."""
    ids, pos, pages, offs, logits_rows = [], [], [], [], []
    dec_tables, dec_lens, pre_tables, pre_lens, cu = [], [], [], [], [0]
    num_decode = 0
    for item in rows:
        n, start, seq_pages = len(item.token_ids), item.start, item.pages
        ids.extend(item.token_ids)
        positions = range(start, start + n)
        pos.extend(positions)
        pages.extend(seq_pages[p // block_tokens] for p in positions)
        offs.extend(p % block_tokens for p in positions)
        if item.is_decode:
            num_decode += 1
            dec_tables.append(seq_pages)
            dec_lens.append(start + n)
        else:
            pre_tables.append(seq_pages)
            pre_lens.append(start + n)
            cu.append(cu[-1] + n)
        if item.all_logits:
            logits_rows.extend(range(len(ids) - n, len(ids)))
        elif item.samples:
            logits_rows.append(len(ids) - 1)

    def t(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return ForwardBatch(
        input_ids=t(ids),
        positions=t(pos),
        slot_pages=t(pages),
        slot_offsets=t(offs),
        num_decode=num_decode,
        decode_block_tables=_block_table(dec_tables, device),
        decode_context_lens=t(dec_lens, torch.int32),
        prefill_block_tables=_block_table(pre_tables, device),
        prefill_cu_seqlens=t(cu, torch.int32),
        prefill_context_lens=t(pre_lens, torch.int32),
        logits_indices=t(logits_rows),
        decode_max_len=max(dec_lens, default=0),
        decode_min_len=min(dec_lens, default=0),
    )
