"""Adapter memory of one base model: host copies, and device copies in pages of the KV pool.

Registration stores a *loader* only (the adapter's file was checked from its header); the
weights are read on first use into a host copy, kept in an LRU cache of ``host_bytes`` (per
base model; copies of adapters being loaded for the step are never dropped), read again from
disk when needed after being dropped. So registering thousands of adapters costs no host
memory until they are used.

On the device an adapter lives in pages of the engine's one page pool (``pool/pages.py``,
S-LoRA's unified paging): the same pages as the KV cache, handed out and evicted by one
policy, so the number of adapters on the device follows demand. Its weights are split along
the rank only, into *pieces*: piece ``l r + k`` holds rank row k of layer l for every
projection group the layout holds, so a shrink's sum over the hidden size is one row of one
piece (one order, wherever the piece lies):

    piece (E elements of the adapter dtype, then, with a mirror, the same E in bf16):
      per group g held (GROUPS' order; P projections, fan-in K, widths W_j):
        A rows [P][K]    projection j's rank row k of A
        BT row [sum W_j] the group's Bs' column k, side by side (B transposed: the expand
                         is a sum of broadcast multiply-adds, no reductions)

An adapter of rank r holds L r pieces, ``pieces_per_page`` to a page in piece order; its page
list is its *page table*: the fused CPU kernel (``kernels.native.lora``, native.h's gp_lora_t)
reads the pieces in place through it. The other paths (torch's and Triton's SGMV kernels, the
batched path) gather the step's adapters from their pages into per-step tensors of the old
slot shapes (:meth:`AdapterPages.gather`: their A ``[S, P R, K]`` with rows ``j r + k``, B
``[S, W, R]``).

The layout depends on the groups the registered adapters target, not on their ranks: an
adapter takes pages for its own rank (a rank-8 adapter beside a rank-64 one takes an eighth
of its pages). A registration that targets a group the layout lacks lays it out again
(``LoadedModel``): the device copies are dropped and read again.

A *mirror* (float32 pieces of a bf16 model on CPU) holds each piece's values in bf16 too, the
bytes the fused kernel reads. A host copy is either whole pieces, mirror included (loading it
into its pages is one copy a page), or, where the pages are host memory (a CPU engine) and
the native kernels are loaded, the file's values themselves (:class:`RawCopy`: a third of
the bytes of a bf16 file's pieces with their mirror), written into the pages by one native
pass over the file layout's packing plan at each load.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gpupool.adapters.base import (
    EXPERT_GROUPS,
    GROUPS,
    AdapterError,
    expert_group,
    groups_for,
)
from gpupool.adapters.peft_format import adapter_weights, layer_masks, read_raw
from gpupool.kernels import native

logger = logging.getLogger(__name__)

ALIGN = 64  # bytes: pieces and their bf16 part start on cache lines


def _widths(cfg) -> dict[str, int]:
    moe = getattr(cfg, "moe_intermediate_size", 0) or 0
    return {"hidden": cfg.hidden_size, "q": cfg.q_size, "kv": cfg.kv_size,
            "inter": cfg.intermediate_size, "moe_inter": moe, "moe_gate_up": 2 * moe}


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def target_groups(targets) -> set[str]:
    """The projection groups an adapter on ``targets`` needs."""
    out = {g for g, (_, projs) in GROUPS.items() if any(p in targets for p, _ in projs)}
    return out | {g for g in map(expert_group, targets) if g}


@dataclass(frozen=True)
class PieceLayout:
    """Where a piece holds each group's rows (see the module's docstring)."""

    groups: tuple[str, ...]  # held groups, GROUPS' order (then the expert groups)
    offsets: dict  # group -> (A's first element, BT's first element) in a piece's part
    fan_in: dict  # group -> K
    widths: dict  # group -> projections' widths
    elems: int  # E: elements of one part
    dtype: torch.dtype
    mirror_offset: int | None  # bytes to the bf16 part; None: no mirror
    piece_bytes: int
    projs: dict  # group -> its projections' names

    @classmethod
    def build(cls, cfg, groups, dtype: torch.dtype, mirror: bool) -> PieceLayout:
        w, spec = _widths(cfg), groups_for(cfg)
        held = tuple(g for g in spec if g in groups)
        offsets, fan_in, widths, e = {}, {}, {}, 0
        for g in held:
            k_in, projs = spec[g]
            fan_in[g] = w[k_in]
            widths[g] = tuple(w[f] for _, f in projs)
            offsets[g] = (e, e + len(projs) * w[k_in])
            e += len(projs) * w[k_in] + sum(widths[g])
        main = _align(e * _elem(dtype))
        mirror_offset = main if mirror else None
        total = _align(main + e * 2) if mirror else main
        return cls(held, offsets, fan_in, widths, e, dtype, mirror_offset, total,
                   {g: tuple(p for p, _ in spec[g][1]) for g in held})

    @property
    def has_bf16(self) -> bool:
        """Whether pieces have a bf16 part (the fused kernel's): a mirror, or bf16 pieces."""
        return self.mirror_offset is not None or self.dtype == torch.bfloat16

    def main(self, buf: torch.Tensor) -> torch.Tensor:
        """The adapter-dtype part of pieces ``buf`` (uint8 [n, piece_bytes]): [n, E]."""
        return buf.view(self.dtype)[:, : self.elems]

    def bf16(self, buf: torch.Tensor) -> torch.Tensor | None:
        """The bf16 part the fused kernel reads: the mirror, or the main part of bf16
        pieces; None for other pieces without a mirror."""
        if self.mirror_offset is not None:
            return buf[:, self.mirror_offset:].view(torch.bfloat16)[:, : self.elems]
        return self.main(buf) if self.dtype == torch.bfloat16 else None

    def fill_mirror(self, buf: torch.Tensor) -> None:
        if self.mirror_offset is not None:
            self.bf16(buf).copy_(self.main(buf))


def _fill_pieces(main: torch.Tensor, layout: PieceLayout, rank: int, weights: dict) -> None:
    """Pieces' main parts (``main`` [L, r, E], zeros) from the weights {(layer, projection):
    (A [r, K], B [W, r])}: the reference packing."""
    for (layer, proj), (a, b) in weights.items():
        for g in layout.groups:
            names = layout.projs[g]
            if proj in names:
                j, k_in = names.index(proj), layout.fan_in[g]
                a0, bt0 = layout.offsets[g]
                main[layer, :, a0 + j * k_in : a0 + (j + 1) * k_in] = a
                col = bt0 + sum(layout.widths[g][:j])
                main[layer, :, col : col + b.shape[0]] = b.T
                break


def pack_adapter(layout: PieceLayout, cfg, rank: int, loader) -> torch.Tensor:
    """The adapter's host copy, whole pieces (uint8 [L r, piece_bytes], zeros where it has
    no LoRA), from ``loader()``, its weights {(layer, projection): (A, B)}. The reference of
    :func:`pack_raw`, and the path of adapters it cannot read."""
    buf = torch.zeros(cfg.num_layers * rank, layout.piece_bytes, dtype=torch.uint8)
    _fill_pieces(layout.main(buf).view(cfg.num_layers, rank, -1), layout, rank, loader())
    layout.fill_mirror(buf)
    return buf


@dataclass(frozen=True)
class PackPlan:
    """Where each value of an adapter file of one layout (``RawFile.signature``) and rank
    goes in its pieces, found once by running the reference packing (:func:`adapter_weights`,
    :func:`_fill_pieces`) on the values' positions instead of the values; then packing an
    adapter of that layout is one gather, one product by its scaling and one scatter
    (:func:`pack_raw`) instead of a few hundred small copies."""

    masks: tuple  # the file's (projection, layer mask) pairs: equal to what was registered
    dst: torch.Tensor  # int64 (index_copy_'s): positions in the pieces (adapter-dtype
    # elements of the whole buffer), A's values then B's
    src: torch.Tensor  # int32 (index_select's, 4 bytes a value): positions in RawFile.values
    num_a: int  # A's values come first (B's are multiplied by the scaling)
    covers: bool  # the values fill every element of the pieces' main parts (no zeros left)
    runs: torch.Tensor  # the same moves as runs (int64 [R, 5]: dst, src, n, src stride,
    # scaled): the native packing's (kernels/native.py pack_pieces), a few thousand runs
    # where dst and src above take 12 bytes a value

    @classmethod
    def build(cls, layout: PieceLayout, cfg, rank: int, raw, path) -> PackPlan:
        masks = layer_masks(path, raw.shapes, cfg, rank)  # AdapterError for a bad file
        per_piece = layout.piece_bytes // _elem(layout.dtype)
        positions = {k: (torch.arange(math.prod(shape), dtype=torch.float64)
                         + raw.starts[k] + 1).view(shape) for k, shape in raw.shapes.items()}
        twin = torch.zeros(cfg.num_layers, rank, layout.elems, dtype=torch.float64)
        _fill_pieces(twin, layout, rank, adapter_weights(positions, 1.0, cfg))
        flat = twin.view(cfg.num_layers * rank, layout.elems)
        nz = flat.nonzero()
        src = (flat[nz[:, 0], nz[:, 1]] - 1).int()
        dst = nz[:, 0] * per_piece + nz[:, 1]
        is_a = torch.zeros(layout.elems, dtype=torch.bool)  # a piece's A rows (else BT)
        for a0, bt0 in layout.offsets.values():
            is_a[a0:bt0] = True
        a = is_a[nz[:, 1]]
        da, sa, db, sb = dst[a], src[a], dst[~a], src[~a]
        covers = bool((flat != 0).all())
        dst, src = torch.cat([da, db]), torch.cat([sa, sb])
        return cls(masks, dst, src, len(da), covers, _runs(dst, src, len(da), per_piece))


def _runs(dst: torch.Tensor, src: torch.Tensor, num_a: int, per_piece: int) -> torch.Tensor:
    """The moves ``dst[i] <- src[i]`` as runs (int64 [R, 5]: dst, src, n, src stride,
    scaled: whether past the first ``num_a``): a run's destinations are consecutive, in one
    piece and all A's or all B's, its sources evenly spaced (A's rows are rows of the file's
    A; a piece holds B's columns, the file's B's rows: stride r)."""
    n = len(dst)
    if n == 0:
        return torch.zeros(0, 5, dtype=torch.int64)
    d, s = dst.long(), src.long()
    # where a run must end: destinations not consecutive, another piece, the B's begin
    apart = torch.ones(n + 1, dtype=torch.bool)
    apart[1:n] = (d[1:] != d[:-1] + 1) | (d[1:] // per_piece != d[:-1] // per_piece)
    if 0 < num_a < n:
        apart[num_a] = True
    step = torch.zeros(n, dtype=torch.int64)
    step[1:] = s[1:] - s[:-1]
    turn = torch.zeros(n + 1, dtype=torch.bool)  # step[i] != step[i - 1]
    turn[2:n] = step[2:] != step[1:-1]
    stops = (apart | turn).nonzero().flatten().tolist()  # sorted, n the last
    hard = set(apart.nonzero().flatten().tolist())
    starts = []  # each run's first value: a few thousand, found run by run
    i = 0
    while i < n:
        starts.append(i)
        if i + 1 in hard:
            i += 1  # one value
        else:  # from i + 1 on the stride is step[i + 1]; it ends at the next stop past it
            i = stops[bisect.bisect_left(stops, i + 2)]
    first = torch.tensor(starts, dtype=torch.int64)
    count = torch.diff(first, append=torch.tensor([n]))
    stride = torch.where(count > 1, step[(first + 1).clamp(max=n - 1)], 1)
    return torch.stack([d[first], s[first], count, stride, (first >= num_a).long()], 1)


def pack_raw(layout: PieceLayout, cfg, rank: int, plan: PackPlan, raw, scaling: float,
             use_native: bool | None = None) -> torch.Tensor | None:
    """:func:`pack_adapter`'s buffer, bit for bit, from the file's bytes by ``plan``; None
    where a value is not finite (the reference path then names it). By the native kernels'
    one pass over the plan's runs where their library is loaded already (never built here:
    this runs at admission) and the pieces are float32 (``use_native``: force it either
    way), else by torch's gather and scatter."""
    fast = (layout.dtype == torch.float32 and native.loaded() if use_native is None
            else use_native)
    buf = torch.empty(cfg.num_layers * rank, layout.piece_bytes, dtype=torch.uint8)
    if fast:  # one pass in C over the runs: the bf16 mirror beside, the zeros (same bits)
        if RawCopy(raw.values, plan.runs, plan.covers, scaling).pack(layout, _rows(buf)):
            return None  # a NaN or inf among them (or an overflow)
        return buf
    values = raw.values.index_select(0, plan.src).float()
    values[plan.num_a:] *= scaling  # as the reference's B * scaling, in float32
    if not math.isfinite(float(values.sum())):  # a NaN or inf among them (or an overflow)
        return None
    # zeros only where nothing is written: the pieces' padding, and the main parts where the
    # adapter leaves some projection of a held group untargeted (a fresh zeroed buffer costs
    # a fill of every byte, beside the engine loop's threads)
    used = layout.elems * _elem(layout.dtype)
    if plan.covers:
        buf[:, used : layout.mirror_offset or layout.piece_bytes].zero_()
    else:
        buf[:, : layout.mirror_offset or layout.piece_bytes].zero_()
    if layout.mirror_offset is not None:
        buf[:, layout.mirror_offset + 2 * layout.elems :].zero_()
    buf.view(-1).view(layout.dtype).index_copy_(0, plan.dst, values.to(layout.dtype))
    layout.fill_mirror(buf)
    return buf


@dataclass(frozen=True)
class RawCopy:
    """A host copy kept as its file's values and packed straight into its pages at each load
    (the native pass over the plan's runs), for device pages in host memory (a CPU engine):
    no packed buffer (float32 pieces and their bf16 mirror: ~3x the bytes of a bfloat16
    file), whose fresh memory costs page faults, and no copy of it into the pages. The
    values were checked finite (after the scaling) when read."""

    values: torch.Tensor  # the file's values (RawFile.values)
    runs: torch.Tensor  # PackPlan.runs
    covers: bool
    scaling: float

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def pack(self, layout: PieceLayout, rows: torch.Tensor | None = None) -> int:
        """Write the pieces at ``rows`` (int64 [L r]: each piece's address; None: write
        nothing); the number of values that are not finite (after the scaling)."""
        return native.pack_pieces(self.values, self.runs, self.scaling, rows,
                                  layout.piece_bytes, layout.elems, layout.mirror_offset,
                                  self.covers)


def _rows(buf: torch.Tensor) -> torch.Tensor:
    """The address of each row (a piece) of ``buf`` (uint8 [n, piece_bytes], contiguous)."""
    return torch.arange(len(buf), dtype=torch.int64) * buf.stride(0) + buf.data_ptr()


def _host_nbytes(copy) -> int:
    return copy.nbytes if isinstance(copy, RawCopy) else copy.numel()


# packing plans (PackPlan): kept for the PLANS_KEPT most recent file layouts, and only for
# adapters of at most PLAN_MAX_VALUES values (12 bytes of indices a value; larger adapters
# pack by the reference path, whose few hundred copies are then large ones)
PLANS_KEPT = 2
PLAN_MAX_VALUES = 1 << 24
# bytes a second of a host-to-device copy and of a disk read before any is measured (the
# eviction policy's cost of bringing an adapter back, pool/pages.py)
COPY_RATE, READ_RATE = 4e9, 1e9
# bytes of experts' LoRA weights copied out of their pieces kept between steps (a decode run
# reads the same experts' again and again; AdapterPages.expert_lora)
EXPERT_CACHE_BYTES = 64 << 20


class Resident:
    """The adapters whose device copy is current (their pages hold them), a live view:
    ``name in resident``, iteration in least-recent-first order, ``len``."""

    def __init__(self, owner: AdapterPages):
        self._owner = owner

    def _current(self):
        o = self._owner
        return [n for n in o._loaded if o.pool.adapter_pages(o.key(n)) is o._loaded[n]]

    def __contains__(self, name) -> bool:
        o = self._owner
        pages = o._loaded.get(name)
        return pages is not None and o.pool.adapter_pages(o.key(name)) is pages

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


class AdapterPages:
    """A base model's adapters: loaders, host copies (LRU within ``host_bytes``), and device
    copies in pages of ``pool`` (the engine's :class:`gpupool.pool.pages.PagePool`) over
    ``memory`` (uint8 [pool pages, page bytes]: the KV region, or a rank's own host memory).

    ``ensure(names)`` makes a step's adapters current on the device (loading those not) and
    returns their page tables. Device copies are owned in the pool by ``(model, name)``; the
    pool evicts idle ones (no running request uses them) when it needs pages, so whether a
    copy is current is asked of the pool (:attr:`resident`)."""

    def __init__(self, cfg, groups, dtype, pool, memory: torch.Tensor, model: str,
                 mirror: bool = False, host_bytes: int = 1 << 30,
                 max_resident: int | None = None):
        self.cfg, self.dtype, self.model = cfg, dtype, model
        self.layout = PieceLayout.build(cfg, groups, dtype, mirror)
        self.groups = set(self.layout.groups)
        self.pool, self.memory = pool, memory
        if memory.dtype != torch.uint8 or memory.dim() != 2 or memory.shape[0] != pool.num_pages:
            raise ValueError("adapter page memory must be uint8 [pages, page bytes]")
        self.page_bytes = memory.shape[1]
        self.pieces_per_page = self.page_bytes // self.layout.piece_bytes
        if self.pieces_per_page < 1:
            raise AdapterError(
                f"one rank row of one layer of these adapters takes "
                f"{self.layout.piece_bytes} bytes, more than a KV page ({self.page_bytes}); "
                "raise kv_page_bytes")
        self.max_resident = max_resident  # max_loras_on_device: a cap, or None
        self.loaders: dict[str, object] = {}  # name -> () -> weights (read from disk)
        self.ranks: dict[str, int] = {}
        self.host: OrderedDict[str, torch.Tensor] = OrderedDict()  # host copies, LRU first
        self.host_budget = host_bytes
        self.host_bytes = 0
        self.num_reads = 0  # adapters read from disk (first uses and re-reads)
        self.num_loads = 0  # device loads
        # name -> the page list (the pool's object) its device copy was loaded into; the
        # copy is current while the pool still gives that very list (see Resident)
        self._loaded: OrderedDict[str, list[int]] = OrderedDict()  # least recent first
        self.resident = Resident(self)
        self.owner: dict[str, str | None] = {}  # loaded name -> the tenant that loaded it
        self.pinned: set[str] = set()  # this step's (their host copies are kept)
        # reads of queued requests' adapters running beside the steps (:meth:`prefetch`)
        self._reading: dict[str, Future] = {}
        self._reader: ThreadPoolExecutor | None = None
        self.num_prefetched = 0  # host copies that came from a prefetch
        self._plans: OrderedDict[tuple, PackPlan] = OrderedDict()
        # host copies kept as the file's values (RawCopy) where the pages are host memory and
        # float32 pieces (the native pass writes those); else packed buffers
        self.raw_copies = memory.device.type == "cpu" and self.layout.dtype == torch.float32
        # measured rates (bytes a second) for the pool's eviction costs
        self.copy_rate, self.read_rate = COPY_RATE, READ_RATE
        # the last gather's (key, views): a step of the same adapters in the same pages, none
        # loaded since, reads the same values (see :meth:`gather`)
        self._gathered: tuple | None = None
        # expert_lora's copies, kept while no device load happened (LRU, EXPERT_CACHE_BYTES)
        self._experts: OrderedDict[tuple, tuple] = OrderedDict()
        self._experts_at, self._experts_bytes = -1, 0

    # ---- registration --------------------------------------------------------------------
    def key(self, name: str) -> tuple[str, str]:
        """The pool's owner key of ``name``'s device copy."""
        return (self.model, name)

    def holds(self, targets) -> bool:
        """Whether the layout has the groups an adapter on ``targets`` needs."""
        return target_groups(targets) <= self.groups

    def add(self, name: str, rank: int, loader) -> None:
        """Register an adapter (the layout :meth:`holds` it): ``loader()`` returns its weights
        when first needed."""
        self.loaders[name] = loader
        self.ranks[name] = rank

    def remove(self, name: str) -> None:
        """Forget an adapter (its pages go back to the pool). The caller ensures nothing runs
        it."""
        future = self._reading.pop(name, None)
        if future is not None:
            future.cancel()
        self._evict(name)
        self.pinned.discard(name)
        self._drop_host(name)
        self.loaders.pop(name, None)
        self.ranks.pop(name, None)

    def adopt(self, old: AdapterPages) -> None:
        """Register ``old``'s adapters here (a layout laid out again: their copies are
        read again on first use) and release ``old``."""
        old.release()
        for name, loader in old.loaders.items():
            self.add(name, old.ranks[name], loader)

    def release(self) -> None:
        """Give every device copy back to the pool and stop the reader (the model or its
        layout goes)."""
        self.close()
        self._gathered = None
        self._drop_experts()
        for name in list(self.loaders):
            self.pool.free_adapter(self.key(name))
        self._loaded.clear()
        self.owner.clear()

    def num_pieces(self, rank: int) -> int:
        return self.cfg.num_layers * rank

    def pages_needed(self, name: str) -> int:
        """Pages ``name``'s device copy takes."""
        return -(-self.num_pieces(self.ranks[name]) // self.pieces_per_page)

    def nbytes(self, name: str) -> int:
        return self.num_pieces(self.ranks[name]) * self.layout.piece_bytes

    def cost(self, name: str) -> float:
        """Seconds to bring ``name`` back to the device once evicted: a copy of its host
        copy, plus a read from disk where the host cache has none (the eviction policy's
        cost, pool/pages.py)."""
        size = self.nbytes(name)
        return size / self.copy_rate + (0.0 if name in self.host else size / self.read_rate)

    def page_request(self, name: str):
        """For the scheduler: (the pool's key, pages, cost) of ``name``'s device copy."""
        return self.key(name), self.pages_needed(name), self.cost(name)

    # ---- host copies ---------------------------------------------------------------------
    def prefetch(self, name: str, limit: int = 8) -> bool:
        """Start reading the adapter's host copy in the background (a queued request's
        whose copy the host cache dropped, while steps run), unless it has one, is being
        read or on the device, ``limit`` reads are in flight, or the reads would hold more
        than the host budget (beside the cache's own: at most twice the budget in all).
        Whether a read started. The copy joins the host cache (which drops its least
        recent copies past the budget) when :meth:`load_host` asks for it; a failed read is
        repeated there, where its error reaches the request."""
        if (name in self.host or name in self._reading or name in self.resident
                or name not in self.loaders
                or len(self._reading) >= limit
                or (len(self._reading) + 1) * self.nbytes(name) > self.host_budget):
            return False
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="gpupool-adapter-read")
        # the loader and rank taken now: the reader touches nothing the engine thread
        # changes but the plans (whole values swapped under the GIL)
        self._reading[name] = self._reader.submit(self._pack, name, self.loaders[name],
                                                  self.ranks[name])
        return True

    def close(self) -> None:
        """Stop the background reader (the pages are being replaced or dropped)."""
        self._reading.clear()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None

    def keep_reads(self, names) -> None:
        """Drop the background reads of adapters not in ``names`` (their requests were
        aborted or already ran): they would hold memory and places in the reader's queue."""
        for name in [n for n in self._reading if n not in names]:
            self._reading.pop(name).cancel()

    def _read(self, name: str) -> torch.Tensor:
        future = self._reading.pop(name, None)
        if future is not None and future.cancel():  # not started: read it here, now
            future = None
        if future is not None:
            try:
                buf = future.result()
                self.num_prefetched += 1
                return buf
            except Exception:  # read again here: the error goes to the request
                pass
        return self._pack(name)

    def _pack(self, name: str, loader=None, rank: int | None = None) -> torch.Tensor:
        """The adapter's host copy, whole pieces (``loader``, ``rank``: the registered ones,
        taken by the caller on the reader thread): from the file's bytes by a plan
        (:func:`pack_raw`) where the loader names an ordinary file and the adapter is small
        enough for plans (PLAN_MAX_VALUES), else (and for any error, which it then reports)
        by :func:`pack_adapter`."""
        loader = self.loaders[name] if loader is None else loader
        rank = self.ranks[name] if rank is None else rank
        spec = getattr(loader, "spec", None)
        if spec is not None and self.num_pieces(rank) * self.layout.elems <= PLAN_MAX_VALUES:
            try:
                buf = self._pack_raw(spec, rank)
            except Exception:  # whatever it is, the reference path reports it
                logger.debug("packing %s from its bytes failed", name, exc_info=True)
                buf = None
            if buf is not None:
                return buf
        return pack_adapter(self.layout, self.cfg, rank, loader)

    def _pack_raw(self, spec, rank: int) -> torch.Tensor | None:
        start = time.perf_counter()
        raw = read_raw(spec.path)
        if raw is None:
            return None
        took = time.perf_counter() - start
        if took > 0:  # the eviction costs' read rate (cached reads count too: a rough one)
            self.read_rate = 0.5 * self.read_rate + 0.5 * raw.values.numel() \
                * raw.values.element_size() / took
        key = (raw.signature, rank)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)  # least recently used dropped first
        else:
            plan = PackPlan.build(self.layout, self.cfg, rank, raw, spec.path)
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        if plan.masks != spec.layers:
            return None
        if self.raw_copies and native.loaded():
            copy = RawCopy(raw.values, plan.runs, plan.covers, spec.scaling)
            # a value not finite: None (the reference path names it)
            return None if copy.pack(self.layout) else copy
        return pack_raw(self.layout, self.cfg, rank, plan, raw, spec.scaling)

    def packed(self, name: str) -> torch.Tensor:
        """``name``'s host copy (:meth:`load_host`) as whole pieces (uint8 [L r,
        piece_bytes]): a packed one as it is, a :class:`RawCopy` packed into a new buffer."""
        copy = self.load_host(name)
        if not isinstance(copy, RawCopy):
            return copy
        buf = torch.empty(self.num_pieces(self.ranks[name]), self.layout.piece_bytes,
                          dtype=torch.uint8)
        copy.pack(self.layout, _rows(buf))
        return buf

    def load_host(self, name: str) -> torch.Tensor | RawCopy:
        """The adapter's host copy, read from disk if the cache has none (AdapterError if
        the file is unreadable or holds non-finite weights); the LRU's least recent copies
        not pinned by the step are dropped past the byte budget."""
        buf = self.host.get(name)
        if buf is not None:
            self.host.move_to_end(name)
            return buf
        buf = self._read(name)
        self.num_reads += 1
        self.host[name] = buf
        self.host_bytes += _host_nbytes(buf)
        for victim in [n for n in self.host if n != name]:
            if self.host_bytes <= self.host_budget:
                break
            if victim not in self.pinned:
                self._drop_host(victim)
        return buf

    def _drop_host(self, name: str) -> None:
        buf = self.host.pop(name, None)
        if buf is not None:
            self.host_bytes -= _host_nbytes(buf)

    # ---- device copies -------------------------------------------------------------------
    def ensure(self, names, owners: dict | None = None,
               tenant_cap: int | None = None) -> dict[str, list[int]]:
        """Each name's page table, loading those not current into pages (the ones the
        scheduler took for it at admission, else new ones from the pool: AdapterError when
        it has none to give). ``owners``: the tenant each name is loaded for; with
        ``tenant_cap``, a tenant that holds that many device copies already gives up its own
        least recent idle one first (so its adapters cannot push other tenants' out); with
        ``max_resident`` (max_loras_on_device) this base's least recent idle copy goes first
        when it has that many. A cap never takes a copy a running request uses (pinned): it
        is then exceeded until those requests end."""
        owners = owners or {}
        self.pinned = set(names)
        for name in [n for n in self._loaded if n not in self.resident]:  # evicted
            self._loaded.pop(name)
            self.owner.pop(name, None)
        for name in names:
            if name in self.resident:
                self._loaded.move_to_end(name)
                self.pool.pin(self.key(name))  # (the scheduler pinned it already)
                self.pool.use_adapter(self.key(name), self.cost(name))
                if name in owners:  # charged to the tenant using it now
                    self.owner[name] = owners[name]
        for name in names:
            if name not in self.resident:
                self._load(name, owners.get(name), tenant_cap, set(names))
        return {n: self._loaded[n] for n in names}

    def _idle(self, names, keep) -> list[str]:
        """Of ``names``, the copies a cap may give up: current, not this step's, and not
        pinned in the pool (no running request uses them)."""
        return [n for n in names if n not in keep and n in self.resident
                and not self.pool.is_pinned(self.key(n))]

    def _load(self, name: str, tenant, tenant_cap, keep) -> None:
        host = self.load_host(name)
        if tenant_cap is not None:
            own = self._idle([n for n in self._loaded if self.owner.get(n) == tenant], keep)
            held = sum(self.owner.get(n) == tenant for n in self._loaded)
            if held >= tenant_cap and own:
                self._evict(own[0])
        if self.max_resident is not None and len(self._loaded) >= self.max_resident:
            idle = self._idle(self._loaded, keep)
            if idle:
                self._evict(idle[0])
        key = self.key(name)
        pages = self.pool.adapter_pages(key)
        if pages is None:  # not taken at admission (a rank, a test): take them now
            pages = self.pool.allocate_adapter(key, self.pages_needed(name), self.cost(name))
            if pages is None:
                raise AdapterError(
                    f"adapter {name!r} needs {self.pages_needed(name)} pages of the KV pool "
                    f"and the pool has {self.pool.num_free_pages} free or evictable; raise "
                    "kv_cache_bytes")
        start = time.perf_counter()
        ppp, bpp = self.pieces_per_page, self.layout.piece_bytes
        if isinstance(host, RawCopy):  # packed straight into the pages
            page, place = self._places(pages, self.ranks[name])
            host.pack(self.layout, page * self.memory.stride(0) + place * bpp
                      + self.memory.data_ptr())
        else:
            for q, page in enumerate(pages):
                chunk = host[q * ppp : (q + 1) * ppp]
                self.memory[page, : chunk.numel()].copy_(chunk.view(-1), non_blocking=True)
        took = time.perf_counter() - start
        if took > 0 and self.memory.device.type == "cpu":
            self.copy_rate = 0.5 * self.copy_rate + 0.5 * self.nbytes(name) / took
        self._loaded[name] = pages
        self._loaded.move_to_end(name)
        self.owner[name] = tenant
        self.num_loads += 1

    def _evict(self, name: str) -> None:
        """Give ``name``'s device copy back to the pool (a cap made room, or it goes)."""
        self._gathered = None
        self._drop_experts()
        self.pool.free_adapter(self.key(name))
        self._loaded.pop(name, None)
        self.owner.pop(name, None)

    def pieces(self) -> torch.Tensor:
        """The page memory as pieces' main parts: [pages, pieces_per_page, E] (a view)."""
        ppp, pb = self.pieces_per_page, self.layout.piece_bytes
        pieces = self.memory[:, : ppp * pb].view(self.memory.shape[0], ppp, pb)
        return pieces.view(self.layout.dtype)[:, :, : self.layout.elems]

    def piece_index(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``name``'s pieces lie (current on the device: after :meth:`ensure`): the
        page and the place in it of piece ``l r + k``, as two index tensors [L r]."""
        page, place = self._places(self._loaded[name], self.ranks[name])
        dev = self.memory.device
        return page.to(dev), place.to(dev)

    def _places(self, table: list[int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The page (of page list ``table``) and the place in it of each of the L r pieces of
        an adapter of ``rank`` (int64 on the host)."""
        q = torch.arange(self.cfg.num_layers * rank, dtype=torch.int64)
        page = torch.tensor(table, dtype=torch.int64)[q // self.pieces_per_page]
        return page, q % self.pieces_per_page

    def expert_lora(self, name: str, layer: int, group: str, expert: int,
                    index: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Expert ``expert``'s A [r, K] and B [W, r] in ``group`` (an expert group) at
        ``layer`` of adapter ``name``, copied out of its pieces (``index``: its
        :meth:`piece_index`): only those values, not the group's whole rows. Copies are
        kept (within EXPERT_CACHE_BYTES, least recent out first) until a device load or an
        eviction, which may have moved or overwritten any adapter's pages."""
        if self._experts_at != self.num_loads:
            self._drop_experts()
        key = (name, layer, group, expert)
        hit = self._experts.get(key)
        if hit is not None:
            self._experts.move_to_end(key)
            return hit
        lay, r = self.layout, self.ranks[name]
        k_in, width = lay.fan_in[group], lay.widths[group][expert]
        a0, bt0 = lay.offsets[group]
        page, place = (t[layer * r : (layer + 1) * r] for t in index)
        pieces = self.pieces()
        a = pieces[:, :, a0 + expert * k_in : a0 + (expert + 1) * k_in][page, place]
        b = pieces[:, :, bt0 + expert * width : bt0 + (expert + 1) * width][page, place]
        out = (a, b.T)
        self._experts[key] = out
        self._experts_bytes += (a.numel() + b.numel()) * a.element_size()
        while self._experts_bytes > EXPERT_CACHE_BYTES and len(self._experts) > 1:
            _, (a_old, b_old) = self._experts.popitem(last=False)
            self._experts_bytes -= (a_old.numel() + b_old.numel()) * a_old.element_size()
        return out

    def _drop_experts(self) -> None:
        self._experts.clear()
        self._experts_at, self._experts_bytes = self.num_loads, 0

    def gather(self, names: list[str], device) -> dict[str, torch.Tensor]:
        """The step's adapters (``names``: slot s is names[s]) copied out of their pages into
        the slot shapes the torch and Triton SGMV kernels and the batched path read:
        ``{layer}.{group}.A`` [S, P R, K] (rows j r + k) and ``{layer}.{proj}.B`` [S, W, R],
        R the largest rank, in the adapter dtype (the dense groups: a mixture's expert
        groups are read per expert, :meth:`expert_lora`); call after :meth:`ensure`. The
        views are kept for the next step of the same adapters in the same pages with no
        device load since (every load, of any adapter, may have reused a page; the callers
        only read them): a decode run of one adapter set gathers once."""
        key = (tuple(names), tuple(tuple(self._loaded[n]) for n in names), self.num_loads,
               str(device))
        if self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1]
        self._gathered = None  # its tensors go before the new ones are made
        views = self._gather(names, device)
        self._gathered = (key, views)
        return views

    def _gather(self, names: list[str], device) -> dict[str, torch.Tensor]:
        lay, cfg = self.layout, self.cfg
        num_layers, count = cfg.num_layers, len(names)
        big = max(self.ranks[n] for n in names)
        pieces = self.pieces()  # [pages, ppp, E]
        # one tensor a group's A and one a projection's B, every layer's in it (a layer's
        # view is contiguous), filled by one copy an adapter: a step's gather costs a few
        # ops a projection, not a few a projection and layer (a mixture's experts: many)
        whole = {}
        dense = [g for g in lay.groups if g not in EXPERT_GROUPS]
        # the expert groups lie after the dense ones in a piece: only the dense part copied
        end = min((lay.offsets[g][0] for g in lay.groups if g in EXPERT_GROUPS),
                  default=lay.elems)
        dense_part = pieces[:, :, :end]
        for g in dense:
            whole["A", g] = torch.zeros(num_layers, count, len(lay.projs[g]) * big,
                                        lay.fan_in[g], dtype=lay.dtype, device=device)
            for p, width in zip(lay.projs[g], lay.widths[g]):
                whole["B", p] = torch.zeros(num_layers, count, width, big, dtype=lay.dtype,
                                            device=device)
        for s, name in enumerate(names):
            r = self.ranks[name]
            mine = dense_part[self.piece_index(name)].view(num_layers, r, end).to(device)
            for g in dense:
                k_in, projs = lay.fan_in[g], lay.projs[g]
                a0, bt0 = lay.offsets[g]
                num_p = len(projs)
                a = mine[:, :, a0 : a0 + num_p * k_in].view(num_layers, r, num_p, k_in)
                whole["A", g][:, s, : num_p * r] = a.transpose(1, 2).reshape(
                    num_layers, num_p * r, k_in)
                col = bt0
                for p, width in zip(projs, lay.widths[g]):
                    whole["B", p][:, s, :, :r] = mine[:, :, col : col + width].transpose(1, 2)
                    col += width
        views = {}
        for g in dense:
            for i in range(num_layers):
                views[f"{i}.{g}.A"] = whole["A", g][i]
                for p in lay.projs[g]:
                    views[f"{i}.{p}.B"] = whole["B", p][i]
        return views

    def check_integrity(self) -> None:
        assert set(self._loaded) <= set(self.ranks), "a loaded adapter is not registered"
        assert set(self.owner) <= set(self._loaded), "an owner recorded without a copy"
        for name in self.resident:
            pages = self._loaded[name]
            assert len(pages) == self.pages_needed(name), "a device copy's pages miscounted"
        owned = [o for o in self.pool.adapters() if o[0] == self.model]
        assert all(o[1] in self.ranks for o in owned), "pages of an unregistered adapter"
        assert set(self.host) <= set(self.ranks), "a host copy of an unregistered adapter"
        assert self.host_bytes == sum(_host_nbytes(b) for b in self.host.values()), (
            "host bytes miscounted")
        assert set(self._reading) <= set(self.ranks), "a read of an unregistered adapter"
