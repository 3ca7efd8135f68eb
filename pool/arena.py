"""The arena: one reservation per device, carved once into a weight region and the pages.

    arena (uint8, pool_bytes)
    | weights: model slabs (SlabAllocator) | pages: KV and adapters (pool/pages.py)  |
    0                                      weight_bytes

Nothing in the steady state asks the framework allocator for weights, adapters or KV: a model
switch is a copy into a slab plus rebinding views; KV and LoRA adapters share the pages
(adapters/paged.py: S-LoRA's unified paging).
:class:`SlabAllocator` is the integer bookkeeping of a region (first fit, neighbours
coalesced on free); it never touches a tensor.
"""

from __future__ import annotations

import bisect

import torch

ALIGN = 256


class SlabAllocator:
    """Byte ranges of one region. ``allocate`` returns an offset or None; ``free`` takes it."""

    def __init__(self, num_bytes: int):
        self.num_bytes = num_bytes
        self._free: list[tuple[int, int]] = [(0, num_bytes)] if num_bytes else []  # sorted
        self._used: dict[int, int] = {}  # offset -> size

    @property
    def num_free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    @property
    def largest_free_bytes(self) -> int:
        return max((size for _, size in self._free), default=0)

    def allocate(self, num_bytes: int) -> int | None:
        size = -(-num_bytes // ALIGN) * ALIGN
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                self._used[off] = size
                return off
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)  # KeyError: not allocated
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    def clone(self) -> SlabAllocator:
        """An independent copy of the bookkeeping (to try a plan without changing this one)."""
        other = SlabAllocator(self.num_bytes)
        other._free, other._used = list(self._free), dict(self._used)
        return other

    def check_integrity(self) -> None:
        """Free and used ranges tile the region exactly, free neighbours coalesced."""
        ranges = sorted(list(self._free) + list(self._used.items()))
        pos = 0
        for off, size in ranges:
            assert off == pos, f"gap or overlap at byte {pos}"
            pos = off + size
        assert pos == self.num_bytes, "ranges do not cover the region"
        for (a, sa), (b, _) in zip(self._free, self._free[1:]):
            assert a + sa < b, "adjacent free ranges were not coalesced"


class Arena:
    """The device reservation and its three regions (views, no copies)."""

    def __init__(self, weight_bytes: int, kv_bytes: int, device):
        self.weight_bytes = -(-weight_bytes // ALIGN) * ALIGN
        self.kv_bytes = kv_bytes
        total = self.weight_bytes + kv_bytes
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self.weights = self.buffer[: self.weight_bytes]
        self.kv = self.buffer[self.weight_bytes :]
        self.kv.zero_()  # never-written KV slots are read (masked) by attention: keep finite
        self.weight_slabs = SlabAllocator(self.weight_bytes)

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel()

    def check_integrity(self) -> None:
        self.weight_slabs.check_integrity()
