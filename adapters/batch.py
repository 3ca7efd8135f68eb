"""Per-step SGMV metadata: which rows use which adapter, and the calls that add LoRA terms.

Rows arrive grouped by adapter (the scheduler sorts decode rows and prefill rows by adapter),
so each run of equal adapters is one segment; base-model runs are segments of rank 0, which
the kernels skip.

Batched path (``LoraBatch.batched``, CPU with float32 slots for a 16-bit model): when every
segment has an adapter and all adapters have the same rank, each group is one batched matmul
over the segments for the shrink and one per projection for the expand, instead of a matmul
per segment and projection (44 small products a SmolLM2 layer at 4 adapters). Segments of
unequal length are gathered into a padded ``[S, longest, K]`` (a zero row fills the short
ones; used while the padding at most doubles the rows) and their results gathered back in
row order. Same products, summed in another order, so within rounding of the segmented
path. Identity claims are made in fp32, which keeps the segmented path.

Fused path (``LoraBatch.native``, a bf16 model on CPU whose float32 pieces have a bf16 mirror,
``adapters.paged``): each group's terms in one call of ``kernels.native.lora``, the adapters
read in place through their page tables, for steps of any size (measured on SmolLM2 with
slots, before the pages: rank 16 on all projections, 4 adapters, 30 layers: 16 rows 2.3 ms
against the batched path's 10.7, 110 rows 9.2 against 29.8, 1000 rows 79 against 244).

The other paths read the step's adapters gathered from their pages into the slot shapes
(``LoraBatch.views``, made on first use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpupool.adapters.base import (
    EXPERT_GROUPS,
    GROUPS,
    expert_group,
    expert_projection,
    groups_for,
)
from gpupool.kernels import native
from gpupool.kernels.backend import TorchOps

PAD_LIMIT = 2  # the batched path pads segments to the longest while that costs <= 2x the rows


@dataclass(frozen=True)
class LoraBatch:
    starts: torch.Tensor  # [S + 1] int32 row boundaries
    slots: torch.Tensor  # [S] int32: each segment's adapter, an index into the gathered views
    group_rows: dict[str, torch.Tensor]  # group -> [S] rows of the stacked A to use
    proj_ranks: dict[str, torch.Tensor]  # projection -> [S] rank (0: not targeted / base)
    proj_offsets: dict[str, torch.Tensor]  # projection -> [S] column offset into h
    groups: frozenset  # the groups the adapters' layout holds (others: no LoRA terms)
    # the step's adapters (slot order) and their pages (adapters.paged.AdapterPages), for
    # the views the torch paths read (gathered from the pages on first use)
    names: tuple = ()
    pages: object = None
    device: object = None
    # the batched path: (segments, rows each, rank, slot index or None when the segments'
    # slots are 0..S-1 in order, projections some adapter targets); None: segmented
    batched: tuple | None = None
    # the fused CPU kernel: native.lora_table of the step (the adapters read in place
    # through their page tables), or None
    native: object = None
    # Triton's kernels reading the pages in place (kernels.sgmv.lora_paged, ops.paged_lora):
    # (starts, seg_rank, seg_pages, page_ids, group -> projection ranks [P, S], the pages as
    # the pieces' dtype), or None
    paged: tuple | None = None
    # the model's kernel backend (kernels.backend): its SGMV kernels for the segmented path
    ops: object = None
    # tensor parallelism (models/tp.py): the sum over the ranks of a row-parallel group's
    # shrink (o, down: each rank holds A's columns of its input), before its expand; None
    # on one rank. The segmented path and the fused kernel (its two halves) have it.
    reduce: object = None
    _views: dict = None  # the gathered views, made on first use
    _memo: dict = None  # apply_expert's per-step lookups (each row's segment, pieces)
    # whether a segment's adapter targets a mixture's experts (the layout may hold their
    # groups for other registered adapters: then this step keeps the one-call experts)
    experts: bool = False

    @classmethod
    def build(cls, row_adapters: list[str | None], tables: dict[str, list[int]], pages,
              targets_of: dict[str, tuple[str, ...]], device, ops=None,
              batched: bool = False, reduce=None) -> LoraBatch:
        """``tables``: each adapter's page table (``pages.ensure``); ``pages``: the base's
        adapters.paged.AdapterPages; ``ops``: the model's kernel backend (default: torch's);
        the fused CPU kernel where ``ops`` has fused LoRA terms, ``batched`` (float32 pieces
        of a bf16 model) and the pieces have a bf16 part; ``reduce``: see the field (then
        the segmented path only)."""
        starts, names = [], []
        for i, name in enumerate(row_adapters):
            if i == 0 or name != row_adapters[i - 1]:
                starts.append(i)
                names.append(name)
        starts.append(len(row_adapters))
        rank_of = pages.ranks
        ranks = [rank_of[n] if n else 0 for n in names]

        def t(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        group_rows, proj_ranks, proj_offsets = {}, {}, {}
        targets = {n: set(targets_of[n]) for n in names if n}
        # the dense groups (the kernels' tables name all four), and a mixture's expert groups
        # where the layout holds them (2E projections: not built for attention-only adapters)
        spec = {g: v for g, v in groups_for(pages.cfg).items()
                if g in GROUPS or g in pages.layout.groups}
        for group, (_, projs) in spec.items():
            # a segment whose adapter targets none of the group's projections skips it (the
            # layout may not even hold the group: adapters.paged.target_groups)
            group_rows[group] = t([len(projs) * r if n and any(p in targets[n]
                                                                for p, _ in projs) else 0
                                   for n, r in zip(names, ranks)])
            for j, (proj, _) in enumerate(projs):
                proj_ranks[proj] = t([r if n and proj in targets[n] else 0
                                      for n, r in zip(names, ranks)])
                proj_offsets[proj] = t([j * r for r in ranks])
        distinct = list(dict.fromkeys(n for n in names if n))
        slot_of = {n: i for i, n in enumerate(distinct)}
        ops = ops if ops is not None else TorchOps()
        layout = pages.layout
        fused = paged = None
        use_fused = (batched and ops.fused_lora and max(ranks) <= native.MAX_LORA_RANK
                     and layout.has_bf16)
        use_paged = not use_fused and reduce is None and getattr(ops, "paged_lora", False)
        if use_fused or use_paged:
            # the kernels that read the pages in place: each segment's page table, and each
            # group's projection ranks [P, S]
            seg_pages, page_ids = [0], []
            for n in names:
                page_ids.extend(tables[n] if n else ())
                seg_pages.append(len(page_ids))
            seg = (t(starts), t(ranks), t(seg_pages), t(page_ids))
            stacked = {g: torch.stack([proj_ranks[p] for p, _ in projs]).contiguous()
                       for g, (_, projs) in GROUPS.items()}
        if use_fused:
            groups = [None if g not in layout.offsets else
                      (layout.offsets[g][0] * 2, layout.offsets[g][1] * 2, layout.widths[g])
                      for g in GROUPS]
            fused = native.lora_table(
                *seg, pages.memory, layout.piece_bytes, layout.mirror_offset or 0, groups,
                list(stacked.values()), pages.cfg.num_layers)
        elif use_paged:
            cols = {g: t([sum(layout.widths[g][:j]) for j in range(len(projs) + 1)])
                    for g, (_, projs) in GROUPS.items() if g in layout.widths}
            paged = (*seg, stacked, pages.memory.view(layout.dtype), cols, max(ranks))
        plan = None
        sizes = [b - a for a, b in zip(starts, starts[1:])]
        total, longest = len(row_adapters), max(sizes)
        # the batched products' shapes follow the step's segments: not with batch invariance
        if (fused is None and paged is None and batched and not ops.batch_invariant
                and reduce is None and all(names)
                and len(set(ranks)) == 1 and len(names) * longest <= PAD_LIMIT * total):
            slots = [slot_of[n] for n in names]
            index = (None if slots == list(range(len(slots)))
                     else torch.tensor(slots, dtype=torch.long, device=device))
            targeted = {p for n in names for p in targets_of[n]}
            pad = None  # unequal segments: each padded to the longest with a zero row
            if len(set(sizes)) > 1:
                rows = [a + i if i < b - a else total for a, b in zip(starts, starts[1:])
                        for i in range(longest)]
                valid = [k for k, r in enumerate(rows) if r < total]  # row order kept
                pad = (torch.tensor(rows, dtype=torch.long, device=device),
                       torch.tensor(valid, dtype=torch.long, device=device))
            plan = (len(names), longest, ranks[0], index, targeted, pad)
        return cls(t(starts), t([slot_of[n] if n else 0 for n in names]), group_rows,
                   proj_ranks, proj_offsets, frozenset(layout.groups), tuple(distinct), pages,
                   device, plan, fused, paged, ops, reduce, {}, {},
                   any(expert_group(p) for n in targets.values() for p in n))

    @property
    def views(self) -> dict[str, torch.Tensor]:
        """The step's adapters in slot shapes, gathered from their pages on first use
        (``AdapterPages.gather``): the torch and Triton paths' input."""
        if not self._views:
            self._views.update(self.pages.gather(list(self.names), self.device))
        return self._views

    def native_table(self, num_layers: int):
        """The step's LoRA terms for ``native.decode_layers`` (the fused path only)."""
        return self.native

    def native_experts(self):
        """The step's expert terms for the one native experts call (``native.moe_lora``: the
        fused path's table, each expert group's offsets, fan-in, width and ranks [E, S]),
        or None where that path does not run them (no fused table; under tensor
        parallelism the row-parallel down's shrink is summed over the ranks first)."""
        if self.native is None or self.reduce is not None:
            return None
        if ("moe",) not in self._memo:  # once a step
            lay, num_experts = self.pages.layout, self.pages.cfg.num_experts
            groups = []
            for group in ("experts_gate_up", "experts_down"):
                base = EXPERT_GROUPS[group][0]
                ranks = (torch.stack([self.proj_ranks[expert_projection(e, base)]
                                      for e in range(num_experts)]).contiguous()
                         if group in lay.groups else None)
                if ranks is None or not bool((ranks > 0).any()):
                    groups.append(None)
                    continue
                a0, bt0 = lay.offsets[group]
                groups.append((2 * a0, 2 * bt0, lay.fan_in[group], lay.widths[group][0],
                               ranks))
            self._memo["moe",] = native.moe_lora(self.native, groups)
        return self._memo["moe",]

    def apply_expert(self, layer: int, group: str, expert: int, rows: torch.Tensor,
                     x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += LoRA(x)`` of expert ``expert``'s ``group`` (experts_gate_up or
        experts_down) for its rows ``x``, which are the step's rows ``rows``: each row by its
        segment's adapter, in the adapter dtype: the expert's A and B read from the
        adapter's pieces in place (``AdapterPages.expert_lora``: a mixture's expert groups
        are never gathered whole), torch's products, a slot's rows at once, or where the
        backend promises batch invariance each row alone (a one-row product of one shape: a
        row's bits whatever shares its step; cheaper here than the fixed-order products of
        ``kernels.fixed``, ~0.1 ms a call at these sizes)."""
        if group not in self.groups:
            return
        proj = expert_projection(expert, EXPERT_GROUPS[group][0])
        if ("segment",) not in self._memo:  # each row's segment, once a step
            sizes = (self.starts[1:] - self.starts[:-1]).long()
            self._memo["segment",] = torch.repeat_interleave(
                torch.arange(len(sizes), device=sizes.device), sizes)
        seg = self._memo["segment",].index_select(0, rows)
        ranks = self.proj_ranks[proj].index_select(0, seg)
        if not bool((ranks > 0).any()):
            return
        slots = self.slots.index_select(0, seg)
        weights = {}  # slot -> (A [r, K], B [W, r])
        for slot in torch.unique(slots[ranks > 0]).tolist():
            name = self.names[slot]
            if ("index", name) not in self._memo:  # its pieces' places, once a step
                self._memo["index", name] = self.pages.piece_index(name)
            weights[slot] = self.pages.expert_lora(name, layer, group, expert,
                                                   self._memo["index", name])
        linear = torch.nn.functional.linear
        if getattr(self.ops, "batch_invariant", False):
            for i, (slot, r) in enumerate(zip(slots.tolist(), ranks.tolist())):
                if r:
                    a, b = weights[slot]
                    delta = linear(linear(x[i : i + 1].to(a.dtype), a), b)
                    out[i : i + 1] = (out[i : i + 1].float() + delta.float()).to(out.dtype)
            return
        for slot, (a, b) in weights.items():
            idx = ((slots == slot) & (ranks > 0)).nonzero().flatten()
            delta = linear(linear(x.index_select(0, idx).to(a.dtype), a), b)
            # added in float32, rounded once (index_add_ on bf16 took ~0.2 ms a call here)
            out[idx] = (out.index_select(0, idx).float() + delta.float()).to(out.dtype)

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:, projection columns] += LoRA(x)`` for every projection of ``group``."""
        if group not in self.groups:  # no registered adapter targets it
            return
        if self.native is not None and x.dtype == out.dtype == torch.bfloat16:
            g = list(GROUPS).index(group)
            if self.reduce is not None and group in ("o", "down"):  # row-parallel: the
                # ranks' partial shrinks added before the expand
                h = torch.zeros(x.shape[0], len(GROUPS[group][1]) * self.native.max_rank)
                native.lora_half(x, h, None, self.native, layer, g)
                native.lora_half(None, self.reduce(h), out, self.native, layer, g)
                return
            native.lora(x, out, self.native, layer, g)
            return
        if self.paged is not None:
            starts, seg_rank, seg_pages, page_ids, proj_rank, mem, cols, top = self.paged
            lay = self.pages.layout
            self.ops.lora_paged(x, out, mem, starts, seg_rank, self.group_rows[group],
                                seg_pages, page_ids, proj_rank[group], layer,
                                self.pages.pieces_per_page,
                                lay.piece_bytes // mem.element_size(), *lay.offsets[group],
                                cols[group], top)
            return
        if self.batched is not None:
            self._apply_batched(layer, group, x, out)
            return
        h = self.ops.sgmv_shrink(x, self.views[f"{layer}.{group}.A"], self.starts,
                                 self.slots, self.group_rows[group])
        if self.reduce is not None and group in ("o", "down"):  # row-parallel: partial sums
            h = self.reduce(h)
        col = 0
        for proj, _ in GROUPS[group][1]:
            b = self.views[f"{layer}.{proj}.B"]
            width = b.shape[1]
            self.ops.sgmv_expand(out[:, col : col + width], h, b, self.starts, self.slots,
                                 self.proj_ranks[proj], self.proj_offsets[proj])
            col += width

    def _apply_batched(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor):
        segs, rows, rank, index, targeted, pad = self.batched
        projs = GROUPS[group][1]
        if not any(p in targeted for p, _ in projs):
            return

        def pick(w: torch.Tensor) -> torch.Tensor:  # the segments' slots, [S, ...]
            return w[:segs] if index is None else w.index_select(0, index)

        a = pick(self.views[f"{layer}.{group}.A"])[:, : len(projs) * rank]  # [S, P*r, K]
        xs = x.to(a.dtype)
        if pad is not None:  # rows gathered per segment, short ones padded with a zero row
            xs = torch.cat([xs, xs.new_zeros(1, xs.shape[1])]).index_select(0, pad[0])
        h = torch.bmm(xs.view(segs, rows, x.shape[1]), a.transpose(1, 2))  # [S, n, P*r]
        col = 0
        for j, (proj, _) in enumerate(projs):
            b = self.views[f"{layer}.{proj}.B"]
            width = b.shape[1]
            if proj in targeted:
                delta = torch.bmm(h[:, :, j * rank : (j + 1) * rank],
                                  pick(b)[:, :, :rank].transpose(1, 2))  # [S, n, N]
                delta = delta.view(segs * rows, width)
                if pad is not None:
                    delta = delta.index_select(0, pad[1])
                out[:, col : col + width].add_(delta)
            col += width
