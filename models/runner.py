"""Build the tensors of one step from the scheduler's integers (the only place that does)."""

from __future__ import annotations

import torch

from gpupool.models.batch import BatchRow, ForwardBatch


def _table(rows: list[list[int]]) -> tuple[list[int], int]:
    """Rows of page ids padded with 0 to the longest (at least 1 wide), flattened."""
    width = max((len(r) for r in rows), default=0) or 1
    flat: list[int] = []
    for r in rows:
        flat.extend(r)
        flat.extend([0] * (width - len(r)))
    return flat, width


def _pooling_split(pools: list[bool]) -> tuple[list[int], int]:
    """The logits rows that sample then those that pool (none when no row pools), and how
    many sample."""
    if not any(pools):
        return [], len(pools)
    sample = [i for i, p in enumerate(pools) if not p]
    return sample + [i for i, p in enumerate(pools) if p], len(sample)


def build_batch(rows: list[BatchRow], block_tokens: int, device,
                rope_long_offset: int = 0) -> ForwardBatch:
    """The step's tensors from its rows (decode rows first): two host-to-device tensors, one
    long and one int32, the fields views of them (a torch.tensor call costs ~7 us on a small
    CPU, and each is a copy to a GPU). ``positions`` index the rotary table: a ``rope_long``
    row's are offset by ``rope_long_offset`` (its long rows)."""
    ids, pos, pages, offs, logits_rows, pools = [], [], [], [], [], []
    dec_tables, dec_lens, pre_tables, pre_lens, cu = [], [], [], [], [0]
    num_decode = 0
    for item in rows:
        n, start, seq_pages = len(item.token_ids), item.start, item.pages
        ids.extend(item.token_ids)
        positions = range(start, start + n)
        pos.extend(range(start + rope_long_offset, start + n + rope_long_offset)
                   if item.rope_long else positions)
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
        first = len(logits_rows)
        if item.all_logits:
            logits_rows.extend(range(len(ids) - n, len(ids)))
        elif item.samples:
            logits_rows.append(len(ids) - 1)
        pools.extend([item.hidden] * (len(logits_rows) - first))
    t, r = len(ids), len(logits_rows)
    split, ns = _pooling_split(pools)
    longs = torch.tensor(ids + pos + pages + offs + logits_rows + split, dtype=torch.long,
                         device=device)
    dec_flat, dec_w = _table(dec_tables)
    pre_flat, pre_w = _table(pre_tables)
    d, s = len(dec_lens), len(pre_lens)
    ints = torch.tensor(dec_lens + cu + pre_lens + dec_flat + pre_flat, dtype=torch.int32,
                        device=device)
    at = d + len(cu) + s
    return ForwardBatch(
        input_ids=longs[:t],
        positions=longs[t : 2 * t],
        slot_pages=longs[2 * t : 3 * t],
        slot_offsets=longs[3 * t : 4 * t],
        num_decode=num_decode,
        decode_block_tables=ints[at : at + len(dec_flat)].view(d, dec_w) if d else ints[:0],
        decode_context_lens=ints[:d],
        prefill_block_tables=ints[at + len(dec_flat) :].view(s, pre_w) if s else ints[:0],
        prefill_cu_seqlens=ints[d : d + len(cu)],
        prefill_context_lens=ints[d + len(cu) : at],
        logits_indices=longs[4 * t : 4 * t + r],
        pooling=((longs[4 * t + r : 4 * t + r + ns], longs[4 * t + r + ns :])
                 if split else None),
        decode_max_len=max(dec_lens, default=0),
        decode_min_len=min(dec_lens, default=0),
    )
