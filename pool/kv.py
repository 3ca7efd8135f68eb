"""The KV page pool shared by all models.

A page is a fixed number of bytes. Each model views a page as
``[num_layers, 2, block_tokens, num_kv_heads, head_dim]`` (2 = key, value), so a model with a
small KV footprint per token fits more tokens in a page, and any free page can serve any model.

    storage (uint8, num_pages * page_bytes)
    | page 0                        | page 1 | ...
    | L0 K [bt,kvh,d] | L0 V | L1 K | ... | unused tail |

:class:`PagePool` is the integer bookkeeping (never touches a tensor); :class:`KVStorage` owns
the bytes and hands out per-model views.
"""

from __future__ import annotations

import torch


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


class KVStorage:
    """The bytes behind the page pool, reserved once, viewed per model."""

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device | str = "cpu",
                 storage: torch.Tensor | None = None):
        """``storage``: an existing zeroed uint8 region (the arena's) of at least
        ``num_pages * page_bytes``; by default a new one is reserved."""
        if page_bytes % 16:
            raise ValueError("kv page size must be a multiple of 16 bytes")
        self.page_bytes = page_bytes
        self.pages = PagePool(num_pages)
        self.host_pages: PagePool | None = None
        self.num_pages_swapped_out = 0
        self.num_pages_swapped_in = 0
        if storage is None:
            storage = torch.zeros(num_pages * page_bytes, dtype=torch.uint8, device=device)
        self.storage = storage[: num_pages * page_bytes]

    def enable_host_swap(self, num_host_pages: int) -> None:
        """A host page pool for preempted requests' KV (pinned on CUDA)."""
        self.host_pages = PagePool(num_host_pages) if num_host_pages else None
        if num_host_pages:
            pin = self.storage.device.type == "cuda"
            self.host_storage = torch.empty(num_host_pages, self.page_bytes, dtype=torch.uint8,
                                            pin_memory=pin)

    def copy_pages(self, pairs: list[tuple[int, int]], to_host: bool) -> None:
        """Copy whole pages: (device page, host page) pairs, device->host or host->device."""
        if not pairs:
            return
        device_view = self.storage.view(self.pages.num_pages, self.page_bytes)
        dev = torch.tensor([d for d, _ in pairs], device=self.storage.device)
        host = torch.tensor([h for _, h in pairs])
        if to_host:
            self.num_pages_swapped_out += len(pairs)
            self.host_storage.index_copy_(0, host, device_view.index_select(0, dev).cpu())
        else:
            self.num_pages_swapped_in += len(pairs)
            device_view.index_copy_(0, dev, self.host_storage.index_select(0, host).to(
                self.storage.device, non_blocking=True))

    def model_view(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """``[num_pages, num_layers, 2, block_tokens, num_kv_heads, head_dim]`` view, no copy."""
        elem = torch.empty((), dtype=dtype).element_size()
        bt = block_tokens_for(self.page_bytes, num_layers * 2 * num_kv_heads * head_dim * elem)
        if bt < 1:
            raise ValueError(
                f"kv page of {self.page_bytes} bytes holds no token of a model needing "
                f"{num_layers * 2 * num_kv_heads * head_dim * elem} bytes per token"
            )
        used = num_layers * 2 * bt * num_kv_heads * head_dim * elem
        pages = self.storage.view(self.pages.num_pages, self.page_bytes)[:, :used]
        return pages.view(dtype).view(
            self.pages.num_pages, num_layers, 2, bt, num_kv_heads, head_dim
        )
