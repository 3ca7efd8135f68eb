"""The KV page pool shared by all models.

A page is a fixed number of bytes. Each model views a page as
``[num_layers, 2, block_tokens, num_kv_heads, head_dim]`` (2 = key, value), so a model with a
small KV footprint per token fits more tokens in a page, and any free page can serve any model.
A model mixing global and windowed layers views a page as one of two groups' (its global
layers', or its windowed layers', :meth:`KVStorage.group_views`), each group with its own page
list per sequence and its own tokens a page.

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
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        block_tokens: int | None = None,
    ) -> torch.Tensor:
        """``[num_pages, num_layers, 2, block_tokens, num_kv_heads, head_dim]`` view, no copy
        (``block_tokens``: fewer tokens a page than fit, else as many as fit)."""
        elem = torch.empty((), dtype=dtype).element_size()
        token_bytes = num_layers * 2 * num_kv_heads * head_dim * elem
        bt = block_tokens_for(self.page_bytes, token_bytes)
        if bt < 1:
            raise ValueError(
                f"kv page of {self.page_bytes} bytes holds no token of a model needing "
                f"{token_bytes} bytes per token"
            )
        if block_tokens is not None:
            if not 0 < block_tokens <= bt:
                raise ValueError(f"a kv page holds 1 to {bt} tokens of these layers, "
                                 f"not {block_tokens}")
            bt = block_tokens
        used = num_layers * 2 * bt * num_kv_heads * head_dim * elem
        pages = self.storage.view(self.pages.num_pages, self.page_bytes)[:, :used]
        return pages.view(dtype).view(
            self.pages.num_pages, num_layers, 2, bt, num_kv_heads, head_dim
        )

    def group_views(self, group_layers: tuple[int, ...], num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """One :meth:`model_view` a KV group of ``group_layers[g]`` layers (a model whose
        global and windowed layers keep pages of their own): the group whose page holds the
        fewest tokens keeps that many, each other group the most a page holds that are a
        multiple of it, so every group's block ends where one of the smallest blocks ends (a
        prefix-cache hit of whole blocks of each)."""
        elem = torch.empty((), dtype=dtype).element_size()
        fits = [block_tokens_for(self.page_bytes, n * 2 * num_kv_heads * head_dim * elem)
                for n in group_layers]
        unit = min(fits)
        if unit < 1:
            raise ValueError(f"kv page of {self.page_bytes} bytes holds no token of a "
                             f"group of {max(group_layers)} layers")
        return tuple(self.model_view(n, num_kv_heads, head_dim, dtype, f // unit * unit)
                     for n, f in zip(group_layers, fits))
