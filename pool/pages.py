"""Integer bookkeeping of KV pages: which page ids are free, which are shared, which hold a
cached prefix. No tensors (the scheduler and the simulator use it anywhere, torch or not);
:class:`gpupool.pool.kv.KVStorage` owns the bytes.

Every page is in exactly one of three states:

    free        on the free list, content meaningless
    held        by one or more sequences (a reference count); a full page of a prompt may be
                held by several sequences at once (a shared prefix) and is then never written
    cached      held by none but still indexed by its prefix key: free memory that a request
                with the same prefix can take back, handed out least recently used first
                when the free list runs dry

A held page may be indexed too (a running request's full pages are cached as soon as they
are computed); when its last holder frees it, it becomes *cached* instead of *free*.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheEntry:
    key: bytes
    model: str
    adapter: str | None


def prefix_root(model: str, adapter: str | None, salt: str | None) -> bytes:
    """The key every chain of (model, adapter, salt) starts from: the same tokens under another
    model or adapter (their KV differs) or another salt (another tenant) never match."""
    text = "\x00".join(("gpupool-prefix-v1", model, adapter or "", salt or ""))
    return hashlib.sha256(text.encode()).digest()


def page_key(parent: bytes, token_ids: list[int]) -> bytes:
    """sha256 chain: the key of a full page is its parent's key and its token ids (stable
    across processes, unlike ``hash()``)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class PagePool:
    """Page ids: free list, reference counts, and the prefix index. ``allocate`` is
    all-or-nothing and evicts cached pages (LRU) when the free list is short; ``free``
    drops one reference."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._refs: dict[int, int] = {}  # held page -> holders
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld indexed pages, LRU first
        self._index: dict[bytes, int] = {}  # prefix key -> page
        self._entry: dict[int, CacheEntry] = {}  # indexed page -> its entry
        self.num_evicted = 0

    @property
    def num_free_pages(self) -> int:
        """Pages ``allocate`` can hand out: free ones and cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return len(self._refs)

    @property
    def num_cached_pages(self) -> int:
        """Indexed pages (held or not): the prefix cache's occupancy."""
        return len(self._entry)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free_pages

    def allocate(self, num_pages: int) -> list[int] | None:
        """``num_pages`` page ids held once each, or None (and nothing taken) when not enough
        are free or evictable. The free list goes first, then cached pages, least recently
        used first (their index entries are dropped)."""
        if num_pages > self.num_free_pages:
            return None
        pages = []
        for _ in range(num_pages):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._cached.popitem(last=False)
                self._unindex(page)
                self.num_evicted += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page nobody holds becomes cached (if indexed,
        most recently used) or free."""
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"page {p} is not allocated")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                del self._refs[p]
                if p in self._entry:
                    self._cached[p] = None
                else:
                    self._free.append(p)

    # ---- the prefix index ----------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest indexed prefix of ``keys`` (a chain: key i's page follows key
        i-1's); nothing is taken."""
        pages = []
        for key in keys:
            page = self._index.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        """Add a holder to each indexed page (a hit): a cached page is no longer evictable."""
        for p in pages:
            if p not in self._entry:
                raise ValueError(f"page {p} holds no cached prefix")
        for p in pages:
            if p in self._refs:
                self._refs[p] += 1
            else:
                del self._cached[p]
                self._refs[p] = 1

    def register(self, page: int, key: bytes, model: str, adapter: str | None) -> bool:
        """Index a held, full page under ``key``; False (nothing changed) when the key is
        indexed already (the same prefix computed twice at once: this copy stays private)
        or the page is indexed under another key."""
        if page not in self._refs:
            raise ValueError(f"page {page} is not allocated")
        if key in self._index or page in self._entry:
            return False
        self._index[key] = page
        self._entry[page] = CacheEntry(key, model, adapter)
        return True

    def is_indexed(self, page: int) -> bool:
        return page in self._entry

    def entries(self) -> list[CacheEntry]:
        return list(self._entry.values())

    def _unindex(self, page: int) -> None:
        entry = self._entry.pop(page)
        del self._index[entry.key]

    def drop(self, model: str, adapter: str | None = None, everything: bool = False) -> int:
        """Forget the cached prefixes of ``model`` (with ``adapter``: only that adapter's;
        ``everything``: all of the model's, its adapters' too). Unheld pages become free;
        held ones stay with their holders, unindexed. Returns the entries dropped."""
        doomed = [p for p, e in self._entry.items()
                  if e.model == model and (everything or e.adapter == adapter)]
        for p in doomed:
            self._unindex(p)
            if p in self._cached:
                del self._cached[p]
                self._free.append(p)
        return len(doomed)

    def evict_all(self) -> int:
        """Empty the cache: every unheld cached page free, every index entry gone."""
        n = len(self._entry)
        for p in list(self._entry):
            self._unindex(p)
        self._free.extend(self._cached)
        self._cached.clear()
        return n

    def reset(self) -> None:
        """Every page free again, the cache empty. Only for recovery, when no sequence holds
        a page."""
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._refs = {}
        self._cached = OrderedDict()
        self._index = {}
        self._entry = {}

    def check_integrity(self, holders: dict[int, int] | None = None) -> None:
        """Raise AssertionError unless every page is in exactly one state, the index and its
        entries agree, and (given ``holders``: page -> how many sequences list it) the
        reference counts equal the holders."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        cached = set(self._cached)
        held = set(self._refs)
        assert not (free & held), "a page is both free and used"
        assert not (free & cached) and not (held & cached), "a cached page is also free/held"
        assert len(free) + len(held) + len(cached) == self.num_pages, "pages were lost"
        assert all(n > 0 for n in self._refs.values()), "a held page has no holder"
        assert set(self._entry) <= held | cached, "an indexed page is free"
        assert cached <= set(self._entry), "a cached page is not indexed"
        assert len(self._index) == len(self._entry), "the index and its entries disagree"
        for p, e in self._entry.items():
            assert self._index.get(e.key) == p, "an index entry points at another page"
        if holders is not None:
            assert holders == self._refs, "reference counts differ from the sequences' pages"


def block_tokens_for(page_bytes: int, kv_bytes_per_token: int) -> int:
    """Tokens of one model that fit in a page (0 when not even one does)."""
    return page_bytes // kv_bytes_per_token
