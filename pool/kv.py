"""The KV page pool shared by all models.

A page is a fixed number of bytes. Each model views a page as
``[num_layers, 2, block_tokens, num_kv_heads, head_dim]`` (2 = key, value), so a model with a
small KV footprint per token fits more tokens in a page, and any free page can serve any model.

    storage (uint8, num_pages * page_bytes)
    | page 0                        | page 1 | ...
    | L0 K [bt,kvh,d] | L0 V | L1 K | ... | unused tail |

:class:`~gpupool.pool.pages.PagePool` (``pages.py``) is the integer bookkeeping;
:class:`KVStorage` owns the bytes and hands out per-model views.
"""

from __future__ import annotations

import torch

from gpupool.pool.pages import PagePool, block_tokens_for


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
        # (pairs, to_host) -> None: whoever else holds a share of every page (a
        # tensor-parallel engine's other ranks) moves it too, before this copy
        self.mirror = None
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
        if self.mirror is not None:
            self.mirror(pairs, to_host)
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
