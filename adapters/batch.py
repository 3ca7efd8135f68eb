"""Per-step SGMV metadata: which rows use which slot, and the calls that add LoRA terms.

Rows arrive grouped by adapter (the scheduler sorts decode rows and prefill rows by adapter),
so each run of equal adapters is one segment; base-model runs are segments of rank 0, which
the kernels skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpupool import kernels
from gpupool.adapters.base import GROUPS


@dataclass(frozen=True)
class LoraBatch:
    starts: torch.Tensor  # [S + 1] int32 row boundaries
    slots: torch.Tensor  # [S] int32
    group_rows: dict[str, torch.Tensor]  # group -> [S] rows of the stacked A to use
    proj_ranks: dict[str, torch.Tensor]  # projection -> [S] rank (0: not targeted / base)
    proj_offsets: dict[str, torch.Tensor]  # projection -> [S] column offset into h
    views: dict[str, torch.Tensor]  # slot views, "{layer}.{name}" -> [num_slots, ...]

    @classmethod
    def build(cls, row_adapters: list[str | None], slot_of: dict[str, int],
              rank_of: dict[str, int], targets_of: dict[str, tuple[str, ...]],
              views: dict[str, torch.Tensor], device) -> LoraBatch:
        starts, names = [], []
        for i, name in enumerate(row_adapters):
            if i == 0 or name != row_adapters[i - 1]:
                starts.append(i)
                names.append(name)
        starts.append(len(row_adapters))
        ranks = [rank_of[n] if n else 0 for n in names]

        def t(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        group_rows, proj_ranks, proj_offsets = {}, {}, {}
        for group, (_, projs) in GROUPS.items():
            group_rows[group] = t([len(projs) * r for r in ranks])
            for j, (proj, _) in enumerate(projs):
                proj_ranks[proj] = t([r if n and proj in targets_of[n] else 0
                                      for n, r in zip(names, ranks)])
                proj_offsets[proj] = t([j * r for r in ranks])
        return cls(t(starts), t([slot_of[n] if n else 0 for n in names]), group_rows,
                   proj_ranks, proj_offsets, views)

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[:, projection columns] += LoRA(x)`` for every projection of ``group``."""
        h = kernels.sgmv_shrink(x, self.views[f"{layer}.{group}.A"], self.starts, self.slots,
                                self.group_rows[group])
        col = 0
        for proj, _ in GROUPS[group][1]:
            b = self.views[f"{layer}.{proj}.B"]
            width = b.shape[1]
            kernels.sgmv_expand(out[:, col : col + width], h, b, self.starts, self.slots,
                                self.proj_ranks[proj], self.proj_offsets[proj])
            col += width
