"""Integer bookkeeping of KV pages: which page ids are free, which are shared, which hold a
cached prefix. No tensors (the scheduler and the simulator use it anywhere, torch or not);
:class:`gpupool.pool.kv.KVStorage` owns the bytes.

Every page is in exactly one of four states:

    free        on the free list, content meaningless
    held        by one or more sequences (a reference count); a full page of a prompt may be
                held by several sequences at once (a shared prefix) and is then never written
    cached      held by none but still indexed by its prefix key: free memory that a request
                with the same prefix can take back
    adapter     one of the pages of an adapter's device copy (``adapters/paged.py``: LoRA
                weights share the pool with the KV cache, S-LoRA's unified paging); an adapter
                a running request uses is *pinned*, the others are *idle*

A held page may be indexed too (a running request's full pages are cached as soon as they
are computed); when its last holder frees it, it becomes *cached* instead of *free*.

When the free list runs dry, ``allocate`` evicts cached pages and idle adapters by one policy
that weighs what each costs to bring back (GreedyDual, Young 1994; Cao and Irani's
GreedyDual-Size): each evictable unit has a priority ``H = L + cost per page``, set when it
becomes evictable or is used; the lowest goes first and ``L`` rises to it, so a unit cheap to
restore goes before one dear to restore, and among units of one cost the least recently used
goes first (plain LRU when all costs are equal). A cached page costs a prefill of its tokens
(``kv_page_cost``, seconds, per model; the engine sets it from the measured cost of a prompt
token); an adapter costs a copy from its host copy, or a read from disk where it has none
(given by the engine with each allocation and use). Pinned adapters and held pages are never
evicted.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from dataclasses import dataclass

# seconds to recompute a cached page of a model the engine has measured no prompt token for
DEFAULT_PAGE_COST_S = 0.01


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
    """Page ids: free list, reference counts, the prefix index and the adapters' pages.
    ``allocate`` is all-or-nothing and evicts cached pages and idle adapters (the module's
    policy) when the free list is short; ``free`` drops one reference."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the KV pool needs at least one page")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._refs: dict[int, int] = {}  # held page -> holders
        self._cached: dict[int, None] = {}  # unheld indexed pages
        self._index: dict[bytes, int] = {}  # prefix key -> page
        self._entry: dict[int, CacheEntry] = {}  # indexed page -> its entry
        self.num_evicted = 0
        # adapters' device copies: owner (any hashable: the engine's (model, adapter)) -> its
        # pages, in the order the adapter's pieces fill them; the list is replaced, never
        # changed, so a holder can tell its copy from a later one by identity
        self._adapters: dict[object, list[int]] = {}
        self._adapter_cost: dict[object, float] = {}  # owner -> seconds to bring it back
        self._pinned: set = set()  # owners a running request uses
        self._idle_pages = 0  # pages of unpinned adapters
        self.num_adapters_evicted = 0
        # eviction (the module's policy): the current priority of each evictable unit
        # (("p", page) or ("a", owner)), and a heap of (priority, order, unit) with stale
        # entries skipped
        self.kv_page_cost: dict[str, float] = {}  # model -> seconds to recompute a page
        self._clock = 0.0
        self._prio: dict[tuple, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, tuple]] = []
        self._order = itertools.count()

    @property
    def num_free_pages(self) -> int:
        """Pages ``allocate`` can hand out: free ones, cached ones and idle adapters' (evicted
        on demand)."""
        return len(self._free) + len(self._cached) + self._idle_pages

    @property
    def num_used_pages(self) -> int:
        """Pages held by at least one sequence."""
        return len(self._refs)

    @property
    def num_cached_pages(self) -> int:
        """Indexed pages (held or not): the prefix cache's occupancy."""
        return len(self._entry)

    @property
    def num_idle_adapter_pages(self) -> int:
        """Pages of adapters no running request uses (counted in num_free_pages)."""
        return self._idle_pages

    @property
    def num_adapter_pages(self) -> int:
        """Pages holding adapters' device copies (pinned or idle)."""
        return sum(len(p) for p in self._adapters.values())

    @property
    def num_evictable_pages(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free_pages

    def allocate(self, num_pages: int) -> list[int] | None:
        """``num_pages`` page ids held once each, or None (and nothing taken) when not enough
        are free or evictable. The free list goes first, then cached pages and idle adapters
        by the module's policy (a cached page's index entry is dropped; an adapter goes
        whole)."""
        pages = self._take(num_pages)
        if pages is not None:
            for page in pages:
                self._refs[page] = 1
        return pages

    def _take(self, num_pages: int) -> list[int] | None:
        if num_pages > self.num_free_pages:
            return None
        while len(self._free) < num_pages:
            self._evict_one()
        return [self._free.pop() for _ in range(num_pages)]

    # ---- eviction ------------------------------------------------------------------------
    def _page_cost(self, page: int) -> float:
        return self.kv_page_cost.get(self._entry[page].model, DEFAULT_PAGE_COST_S)

    def _set_prio(self, unit: tuple, cost_per_page: float) -> None:
        """The unit became evictable or was used: priority L + its cost a page."""
        prio = (self._clock + cost_per_page, next(self._order))
        self._prio[unit] = prio
        heapq.heappush(self._heap, (*prio, unit))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the live priorities when it is mostly stale entries (each
        use pushes one: bounded whether or not anything is evicted)."""
        if len(self._heap) > 4 * (len(self._prio) + 16):
            self._heap = [(*p, u) for u, p in self._prio.items()]
            heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        """Free the evictable unit of the lowest priority (there is one: the caller checked
        ``num_free_pages``)."""
        while True:
            prio, order, unit = heapq.heappop(self._heap)
            if self._prio.get(unit) != (prio, order):
                continue  # stale: used again since, or no longer evictable
            kind, key = unit
            if kind == "a" and key in self._pinned:
                del self._prio[unit]  # set again when it becomes idle
                continue
            break
        del self._prio[unit]
        self._clock = prio
        if kind == "p":
            del self._cached[key]
            self._unindex(key)
            self._free.append(key)
            self.num_evicted += 1
        else:
            self._drop_adapter(key)
            self.num_adapters_evicted += 1
        self._compact()

    # ---- adapters' pages -----------------------------------------------------------------
    def allocate_adapter(self, owner, num_pages: int, cost_s: float) -> list[int] | None:
        """Pages for ``owner``'s device copy (pinned until :meth:`set_pinned` says otherwise:
        it is being loaded for a step), or None (nothing taken) when not enough are free or
        evictable; ``cost_s``: what bringing it back would cost, in seconds."""
        if owner in self._adapters:
            raise ValueError(f"adapter {owner!r} already has pages")
        pages = self._take(num_pages)
        if pages is None:
            return None
        self._adapters[owner] = pages
        self._adapter_cost[owner] = cost_s
        self._pinned.add(owner)
        return pages

    def adapter_pages(self, owner) -> list[int] | None:
        """The pages of ``owner``'s device copy, or None when it has none (never loaded, or
        evicted)."""
        return self._adapters.get(owner)

    def adapters(self) -> dict:
        """Owner -> pages of every adapter on the device."""
        return dict(self._adapters)

    def use_adapter(self, owner, cost_s: float | None = None) -> None:
        """``owner`` was used now (its priority rises); ``cost_s``: its cost changed (its
        host copy was dropped or made)."""
        if owner not in self._adapters:
            return
        if cost_s is not None:
            self._adapter_cost[owner] = cost_s
        self._set_prio(("a", owner),
                       self._adapter_cost[owner] / max(1, len(self._adapters[owner])))

    def set_pinned(self, owners) -> None:
        """The adapters running requests use (never evicted); the others are idle."""
        owners = {o for o in owners if o in self._adapters}
        for o in self._pinned - owners:
            if o in self._adapters and ("a", o) not in self._prio:
                self.use_adapter(o)
        self._pinned = owners
        self._idle_pages = sum(len(p) for o, p in self._adapters.items() if o not in owners)

    def is_pinned(self, owner) -> bool:
        return owner in self._pinned

    def pin(self, owner) -> None:
        """Add ``owner`` to the pinned adapters (a request using it was admitted)."""
        if owner in self._adapters and owner not in self._pinned:
            self._pinned.add(owner)
            self._idle_pages -= len(self._adapters[owner])

    def free_adapter(self, owner) -> bool:
        """Drop ``owner``'s device copy (the adapter was removed); whether it had one."""
        if owner not in self._adapters:
            return False
        self._drop_adapter(owner)
        return True

    def _drop_adapter(self, owner) -> None:
        pages = self._adapters.pop(owner)
        self._adapter_cost.pop(owner, None)
        self._prio.pop(("a", owner), None)
        if owner in self._pinned:
            self._pinned.discard(owner)
        else:
            self._idle_pages -= len(pages)
        self._free.extend(pages)

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
                    self._set_prio(("p", p), self._page_cost(p))
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
                del self._prio["p", p]
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
                del self._prio["p", p]
                self._free.append(p)
        return len(doomed)

    def evict_all(self) -> int:
        """Empty the cache: every unheld cached page free, every index entry gone."""
        n = len(self._entry)
        for p in list(self._entry):
            self._unindex(p)
        self._free.extend(self._cached)
        for p in self._cached:
            del self._prio["p", p]
        self._cached.clear()
        return n

    def reset(self) -> None:
        """Every page free again, the cache empty, no adapter on the device. Only for
        recovery, when no sequence holds a page."""
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._refs = {}
        self._cached = {}
        self._index = {}
        self._entry = {}
        self._adapters, self._adapter_cost, self._pinned = {}, {}, set()
        self._idle_pages = 0
        self._prio, self._heap = {}, []

    def check_integrity(self, holders: dict[int, int] | None = None) -> None:
        """Raise AssertionError unless every page is in exactly one state, the index and its
        entries agree, and (given ``holders``: page -> how many sequences list it) the
        reference counts equal the holders."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        cached = set(self._cached)
        held = set(self._refs)
        adapter = [p for pages in self._adapters.values() for p in pages]
        owned = set(adapter)
        assert len(owned) == len(adapter), "two adapters (or one twice) hold a page"
        assert not (free & held), "a page is both free and used"
        assert not (free & cached) and not (held & cached), "a cached page is also free/held"
        assert not (owned & (free | held | cached)), "an adapter's page is also free/held/cached"
        assert len(free) + len(held) + len(cached) + len(owned) == self.num_pages, (
            "pages were lost")
        assert self._pinned <= set(self._adapters), "a pinned adapter has no pages"
        assert self._idle_pages == sum(len(p) for o, p in self._adapters.items()
                                       if o not in self._pinned), "idle pages miscounted"
        evictable = {("p", p) for p in cached} | {("a", o) for o in self._adapters
                                                  if o not in self._pinned}
        assert evictable <= set(self._prio), "an evictable unit has no priority"
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
