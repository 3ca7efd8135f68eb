"""Integer bookkeeping of KV pages: which page ids are free. No tensors (the scheduler and the
simulator use it anywhere, torch or not); :class:`gpupool.pool.kv.KVStorage` owns the bytes."""

from __future__ import annotations


class PagePool:
    """Free list of page ids. ``allocate`` is all-or-nothing; ``free`` of owned pages is safe."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._used: set[int] = set()

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return len(self._used)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int] | None:
        """``num_pages`` page ids, or None (and nothing taken) when not enough are free."""
        if num_pages > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(num_pages)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not allocated")
            self._used.remove(p)
            self._free.append(p)

    def reset(self) -> None:
        """Every page free again. Only for recovery, when no sequence holds a page."""
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._used = set()

    def check_integrity(self) -> None:
        """Raise AssertionError unless free + used == total with no page in both."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not (free & self._used), "a page is both free and used"
        assert len(free) + len(self._used) == self.num_pages, "pages were lost"


def block_tokens_for(page_bytes: int, kv_bytes_per_token: int) -> int:
    """Tokens of one model that fit in a page (0 when not even one does)."""
    return page_bytes // kv_bytes_per_token
