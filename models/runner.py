"""Build the tensors of one step from the scheduler's integers (the only place that does)."""

from __future__ import annotations

import dataclasses

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


def _slots(rows: list[BatchRow], tables: list[list[int]], bt: int) -> tuple[list, ...]:
    """A KV group's slots (its tables: each row's pages, ``bt`` tokens a page): each token's
    page and slot, the decode rows' and the prefill rows' block tables."""
    pages, offs, dec, pre = [], [], [], []
    for item, table in zip(rows, tables):
        for p in range(item.start, item.start + len(item.token_ids)):
            pages.append(table[p // bt])
            offs.append(p % bt)
        (dec if item.is_decode else pre).append(table)
    return pages, offs, dec, pre


def build_batch(rows: list[BatchRow], block_tokens: int, device,
                rope_long_offset: int = 0, window_tokens: int = 0) -> ForwardBatch:
    """The step's tensors from its rows (decode rows first): two host-to-device tensors, one
    long and one int32, the fields views of them (a torch.tensor call costs ~7 us on a small
    CPU, and each is a copy to a GPU). ``positions`` index the rotary table: a ``rope_long``
    row's are offset by ``rope_long_offset`` (its long rows). ``window_tokens``: a model
    mixing global and windowed layers, the windowed layers' tokens a page (their slots and
    block tables from each row's ``window_pages``: ``ForwardBatch.window_group``)."""
    ids, pos, logits_rows, pools = [], [], [], []
    dec_lens, pre_lens, cu = [], [], [0]
    for item in rows:
        n, start = len(item.token_ids), item.start
        ids.extend(item.token_ids)
        pos.extend(range(start + rope_long_offset, start + n + rope_long_offset)
                   if item.rope_long else range(start, start + n))
        if item.is_decode:
            dec_lens.append(start + n)
        else:
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
    end = 4 * t + r + len(split)  # the window group's slots after the rest
    pages, offs, *own = _slots(rows, [item.pages for item in rows], block_tokens)
    wpages, woffs, *wtables = (_slots(rows, [item.window_pages for item in rows], window_tokens)
                               if window_tokens else ([], [], [], []))
    longs = torch.tensor(ids + pos + pages + offs + logits_rows + split + wpages + woffs,
                         dtype=torch.long, device=device)
    tables = [_table(x) for x in (*own, *wtables)]
    d, s = len(dec_lens), len(pre_lens)
    ints = torch.tensor(dec_lens + cu + pre_lens + [v for flat, _ in tables for v in flat],
                        dtype=torch.int32, device=device)
    at, views = d + len(cu) + s, []  # each table [rows, width] (none: an empty tensor)
    for (flat, width), count in zip(tables, (d, s, *map(len, wtables))):
        views.append(ints[at : at + len(flat)].view(count, width) if count else ints[:0])
        at += len(flat)
    batch = ForwardBatch(
        input_ids=longs[:t], positions=longs[t : 2 * t], slot_pages=longs[2 * t : 3 * t],
        slot_offsets=longs[3 * t : 4 * t], num_decode=d, decode_block_tables=views[0],
        decode_context_lens=ints[:d], prefill_block_tables=views[1],
        prefill_cu_seqlens=ints[d : d + len(cu)],
        prefill_context_lens=ints[d + len(cu) : d + len(cu) + s],
        logits_indices=longs[4 * t : 4 * t + r],
        pooling=((longs[4 * t + r : 4 * t + r + ns], longs[4 * t + r + ns : end])
                 if split else None),
        decode_max_len=max(dec_lens, default=0), decode_min_len=min(dec_lens, default=0))
    return batch if not window_tokens else dataclasses.replace(
        batch, window_group=dataclasses.replace(
            batch, slot_pages=longs[end : end + t], slot_offsets=longs[end + t : end + 2 * t],
            decode_block_tables=views[2], prefill_block_tables=views[3]))
