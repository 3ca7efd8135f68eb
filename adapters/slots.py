"""Adapter memory of one base model: host copies, device slots, LRU with pinning.

Registration stores a *loader* only (the adapter's file was checked from its header); the
weights are read on first use into a host copy, kept in an LRU cache of ``host_bytes`` (per
base model; copies of adapters on the device or pinned by the step are never dropped), read
again from disk when needed after being dropped. So registering thousands of adapters costs
no host memory until they are used.

Every adapter of a base is stored in one *slot layout*, so loading an adapter into a device
slot is one bulk copy. The layout is sized by the adapters registered, not by
``max_lora_rank``: each projection group gets the largest rank of the adapters that target one
of its projections (:func:`group_ranks`), and a group none targets is left out (rank-8
adapters of q/k/v/o take a seventh of a slot sized for rank 16 on every projection). A
registration that needs more makes the owner lay the slots out again (``LoadedModel``):

    slot layout, per layer i (R = the group's rank, r = the adapter's rank):
      i.qkv.A  [3R, hidden]  rows 0:r = q's A, r:2r = k's A, 2r:3r = v's A (packed by r)
      i.q_proj.B [q, R]  i.k_proj.B [kv, R]  i.v_proj.B [kv, R]   (columns 0:r used)
      i.o.A [R, q]  i.o_proj.B [hidden, R]
      i.gate_up.A [2R, hidden]  i.gate_proj.B [inter, R]  i.up_proj.B [inter, R]
      i.down.A [R, inter]  i.down_proj.B [hidden, R]

The device buffer is ``[num_slots, slot_bytes]``: a view of the base model's range of the
arena's adapter region (``WeightPool.adapter_buffer``), never an allocation of its own. Each
tensor is viewed across slots as ``[num_slots, *shape]`` so the SGMV kernels index it by slot
id.

A *mirror* (``mirror=True``: float32 slots of a bf16 model on CPU, for the fused LoRA kernel,
``kernels.native.lora``) follows the slots in the same range: per slot, each group's A in bf16
and its projections' B stacked and transposed in bf16, refreshed whenever an adapter is loaded
into the slot:

    mirror layout, per layer i:  i.{group}.A [P R, fan_in]   i.{group}.BT [R, sum of widths]

Half the bytes of the float32 slots for the kernel to read, and an expand without reductions.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gpupool.adapters.base import GROUPS, AdapterError
from gpupool.adapters.peft_format import RawFile, adapter_weights, layer_masks, read_raw
from gpupool.pool.weights import WeightLayout

logger = logging.getLogger(__name__)


def _widths(cfg) -> dict[str, int]:
    return {"hidden": cfg.hidden_size, "q": cfg.q_size, "kv": cfg.kv_size,
            "inter": cfg.intermediate_size}


def group_ranks(adapters) -> dict[str, int]:
    """The rank of each projection group in a slot layout that holds every adapter of
    ``adapters`` ((rank, targeted projections) pairs): the largest rank among those targeting
    one of its projections; groups none targets are absent."""
    ranks: dict[str, int] = {}
    for rank, targets in adapters:
        for group, (_, projs) in GROUPS.items():
            if any(p in targets for p, _ in projs):
                ranks[group] = max(ranks.get(group, 0), rank)
    return ranks


def slot_layout(cfg, ranks: dict[str, int], dtype: torch.dtype) -> WeightLayout:
    """One slot's tensors: each group of ``ranks`` (group -> R) at its rank."""
    w, shapes = _widths(cfg), {}
    for i in range(cfg.num_layers):
        for group, (fan_in, projs) in GROUPS.items():
            rank = ranks.get(group, 0)
            if rank:
                shapes[f"{i}.{group}.A"] = (len(projs) * rank, w[fan_in])
                for proj, fan_out in projs:
                    shapes[f"{i}.{proj}.B"] = (w[fan_out], rank)
    return WeightLayout.build(shapes, dtype)


def mirror_layout(cfg, ranks: dict[str, int]) -> WeightLayout:
    w, shapes = _widths(cfg), {}
    for i in range(cfg.num_layers):
        for group, (fan_in, projs) in GROUPS.items():
            rank = ranks.get(group, 0)
            if rank:
                shapes[f"{i}.{group}.A"] = (len(projs) * rank, w[fan_in])
                shapes[f"{i}.{group}.BT"] = (rank, sum(w[f] for _, f in projs))
    return WeightLayout.build(shapes, torch.bfloat16)


def fill_mirror(mirror: dict[str, torch.Tensor], views: dict[str, torch.Tensor],
                num_layers: int, slot: int) -> None:
    """Slot ``slot`` of the mirror from the slots' views: A rounded to bf16, each group's Bs
    ([width, R] each) stacked, transposed and rounded."""
    for i in range(num_layers):
        for group, (_, projs) in GROUPS.items():
            if f"{i}.{group}.A" not in mirror:  # no adapter targets the group
                continue
            mirror[f"{i}.{group}.A"][slot].copy_(views[f"{i}.{group}.A"][slot])
            bt = mirror[f"{i}.{group}.BT"][slot]
            col = 0
            for proj, _ in projs:
                b = views[f"{i}.{proj}.B"][slot]  # [width, R]
                bt[:, col : col + b.shape[0]].copy_(b.T)
                col += b.shape[0]


# packing plans (PackPlan): kept for the PLANS_KEPT most recent file layouts, and only for
# slots of at most PLAN_MAX_VALUES values (12 bytes of indices a value; larger adapters pack
# by the reference path, whose few hundred copies are then large ones)
PLANS_KEPT = 2
PLAN_MAX_VALUES = 1 << 24


def _fill_slot(views: dict[str, torch.Tensor], cfg, rank: int, weights: dict) -> None:
    """One slot's tensors (``views``, zeros) from the weights {(layer, projection): (A, B)}."""
    for i in range(cfg.num_layers):
        for group, (_, projs) in GROUPS.items():
            for j, (proj, _) in enumerate(projs):
                ab = weights.get((i, proj))
                if ab is not None:  # the layout has its group (it was sized to hold it)
                    views[f"{i}.{group}.A"][j * rank : (j + 1) * rank] = ab[0]
                    views[f"{i}.{proj}.B"][:, :rank] = ab[1]


def pack_adapter(layout: WeightLayout, cfg, rank: int, loader) -> torch.Tensor:
    """A host buffer in slot layout holding one adapter (zeros where it has no LoRA), from
    ``loader()``, its weights {(layer, projection): (A, B)}. The reference of
    :func:`pack_raw`, and the path of adapters it cannot read."""
    weights = loader()
    buf = layout.allocate("cpu")
    buf.zero_()
    _fill_slot(layout.views(buf), cfg, rank, weights)
    return buf


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _index_twin(specs, dtype: torch.dtype, first: int = 1) -> dict[str, torch.Tensor]:
    """Each spec's tensor holding its elements' positions in a buffer of ``dtype`` elements
    (plus ``first``), as float64 (exact to 2**53): moved by the code that moves values, they
    say where each value came from."""
    elem = _elem(dtype)
    return {s.name: (torch.arange(s.numel, dtype=torch.float64)
                     + (s.offset_bytes // elem + first)).view(s.shape) for s in specs}


def _moves(specs, dtype: torch.dtype, twin: dict[str, torch.Tensor]):
    """(destination, source) element positions of each spec's filled elements (``twin``:
    source position + 1 where filled, 0 where not), destinations in a buffer of ``dtype``."""
    elem, out = _elem(dtype), {}
    for s in specs:
        v = twin[s.name].reshape(-1)
        nz = v.nonzero().squeeze(1)
        out[s.name] = (nz + s.offset_bytes // elem, (v[nz] - 1).int())  # int64, int32
    return out


@dataclass(frozen=True)
class PackPlan:
    """Where each value of an adapter file of one layout (``RawFile.signature``) and rank
    goes in a slot, found once by running the reference packing (:func:`adapter_weights`,
    :func:`_fill_slot`) on the values' positions instead of the values; then packing an
    adapter of that layout is one gather, one product by its scaling and one scatter
    (:func:`pack_raw`) instead of a few hundred small copies."""

    masks: tuple  # the file's (projection, layer mask) pairs: equal to what was registered
    dst: torch.Tensor  # int64 (index_copy_'s): positions in the slot (its dtype's
    # elements), A's values then B's
    src: torch.Tensor  # int32 (index_select's, 4 bytes a value): positions in RawFile.values
    num_a: int  # A's values come first (B's are multiplied by the scaling)

    @classmethod
    def build(cls, layout: WeightLayout, dtype: torch.dtype, cfg, rank: int,
              raw: RawFile, path) -> PackPlan:
        masks = layer_masks(path, raw.shapes, cfg, rank)  # AdapterError for a bad file
        positions = {k: (torch.arange(math.prod(shape), dtype=torch.float64)
                         + raw.starts[k] + 1).view(shape) for k, shape in raw.shapes.items()}
        twin = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in layout.specs}
        _fill_slot(twin, cfg, rank, adapter_weights(positions, 1.0, cfg))
        moves = _moves(layout.specs, dtype, twin)
        a = [moves[n] for n in moves if not n.endswith(".B")]
        b = [moves[n] for n in moves if n.endswith(".B")]
        dst = torch.cat([d for d, _ in a + b])
        src = torch.cat([s for _, s in a + b])
        return cls(masks, dst, src, sum(len(d) for d, _ in a))


def pack_raw(layout: WeightLayout, dtype: torch.dtype, plan: PackPlan, raw: RawFile,
             scaling: float) -> torch.Tensor | None:
    """:func:`pack_adapter`'s buffer, bit for bit, from the file's bytes by ``plan``; None
    where a value is not finite (the reference path then names it)."""
    values = raw.values.index_select(0, plan.src).float()
    values[plan.num_a:] *= scaling  # as the reference's B * scaling, in float32
    if not math.isfinite(float(values.sum())):  # a NaN or inf among them (or an overflow)
        return None
    buf = layout.allocate("cpu")
    buf.zero_()
    buf.view(dtype).index_copy_(0, plan.dst, values.to(dtype))
    return buf


def mirror_moves(cfg, ranks: dict[str, int], layout: WeightLayout, dtype: torch.dtype):
    """(mirror positions, slot positions): :func:`fill_mirror` as one gather, found by
    running it on the slot's element positions (bf16 mirror elements, ``dtype`` slot
    elements, within one slot's row)."""
    mirror = mirror_layout(cfg, ranks)
    views = {n: t.unsqueeze(0) for n, t in _index_twin(layout.specs, dtype).items()}
    twin = {s.name: torch.zeros(1, *s.shape, dtype=torch.float64) for s in mirror.specs}
    fill_mirror(twin, views, cfg.num_layers, 0)
    moves = _moves(mirror.specs, torch.bfloat16, {n: t[0] for n, t in twin.items()})
    return (torch.cat([d for d, _ in moves.values()]),
            torch.cat([s for _, s in moves.values()]))


def _views(layout: WeightLayout, buffer: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """Each tensor of ``layout`` across the slots' rows of ``buffer``: [num_slots, *shape]."""
    elem = _elem(dtype)
    views = {}
    for s in layout.specs:
        cols = buffer[:, s.offset_bytes : s.offset_bytes + s.numel * elem]
        views[s.name] = cols.view(dtype).view(buffer.shape[0], *s.shape)
    return views


class AdapterSlots:
    """``num_slots`` device slots for one base model, least recently used evicted first
    (:meth:`grow` moves them to a larger range: how the slots follow demand).

    ``ensure(names)`` makes a step's adapters resident and pins them for that step; slots of
    pinned adapters are never chosen as victims. Host buffers live in ``host`` (name -> bytes).
    ``memory`` is the device memory of the slots: a uint8 tensor of :meth:`num_bytes` bytes
    (a range of the arena's adapter region), viewed, never copied or reallocated.
    """

    @staticmethod
    def num_bytes(cfg, num_slots: int, ranks: dict[str, int], dtype,
                  mirror: bool = False) -> int:
        """Bytes of ``num_slots`` slots laid out for ``ranks`` (:func:`group_ranks`)."""
        per_slot = slot_layout(cfg, ranks, dtype).num_bytes
        if mirror:
            per_slot += mirror_layout(cfg, ranks).num_bytes
        return num_slots * per_slot

    def __init__(self, cfg, num_slots: int, ranks: dict[str, int], dtype,
                 memory: torch.Tensor, mirror: bool = False, host_bytes: int = 1 << 30):
        self.cfg = cfg
        self.group_ranks = dict(ranks)
        self.layout = slot_layout(cfg, ranks, dtype)
        self.dtype, self.has_mirror = dtype, mirror
        self.mirror: dict[str, torch.Tensor] | None = None
        self._bind(num_slots, memory)
        # the fused CPU LoRA kernel's view of the mirror per (layer, group)
        # (kernels.native.lora_weights) and per layer count (("body", layers):
        # kernels.native.lora_table_body): addresses, fixed while this memory is
        self.native_weights: dict = {}
        self.loaders: dict[str, object] = {}  # name -> () -> weights (read from disk)
        self.host: OrderedDict[str, torch.Tensor] = OrderedDict()  # host copies, LRU first
        self.host_budget = host_bytes
        self.host_bytes = 0
        self.num_reads = 0  # adapters read from disk (first uses and re-reads)
        self.ranks: dict[str, int] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self.owner: dict[str, str | None] = {}  # resident name -> the tenant that loaded it
        self.pinned: set[str] = set()
        self.num_loads = 0
        # reads of queued requests' adapters running beside the steps (:meth:`prefetch`):
        # name -> the future host copy; one reader thread, made on first use
        self._reading: dict[str, Future] = {}
        self._reader: ThreadPoolExecutor | None = None
        self.num_prefetched = 0  # host copies that came from a prefetch
        # (file layout, rank) -> PackPlan, the few most recent (adapters of one base are
        # mostly made alike: one plan serves thousands)
        self._plans: OrderedDict[tuple, PackPlan] = OrderedDict()
        self._mirror_moves = None  # mirror_moves of this layout, made on first use

    def _bind(self, num_slots: int, memory: torch.Tensor) -> None:
        """Slots, views and mirror over ``memory`` (uint8, :meth:`num_bytes` for
        ``num_slots``)."""
        nbytes = self.num_bytes(self.cfg, num_slots, self.group_ranks, self.dtype,
                                self.has_mirror)
        if memory.dtype != torch.uint8 or memory.dim() != 1 or memory.numel() != nbytes:
            raise ValueError(f"adapter slot memory must be uint8 of {nbytes} bytes")
        self.num_slots = num_slots
        slot_bytes = num_slots * self.layout.num_bytes
        self.buffer = memory[:slot_bytes].view(num_slots, self.layout.num_bytes)
        self.views = _views(self.layout, self.buffer, self.dtype)
        # bf16 copies for the fused CPU kernel (see the module's docstring), or None
        self._mirror_rows = None
        if self.has_mirror:
            self._mirror_rows = memory[slot_bytes:].view(num_slots, -1)
            self.mirror = _views(mirror_layout(self.cfg, self.group_ranks),
                                 self._mirror_rows, torch.bfloat16)

    def grow(self, num_slots: int, memory: torch.Tensor) -> None:
        """Move to ``memory`` (:meth:`num_bytes` for ``num_slots`` >= the current count, a new
        range of the arena's adapter region) keeping every slot's contents and index; the
        caller then frees the old range."""
        old, old_mirror, count = self.buffer, self._mirror_rows, self.num_slots
        self._bind(num_slots, memory)
        self.buffer[:count].copy_(old)
        if old_mirror is not None:
            self._mirror_rows[:count].copy_(old_mirror)
        self.native_weights.clear()  # addresses of the old range

    def ranks_with(self, rank: int, targets) -> dict[str, int]:
        """The layout's group ranks widened to hold an adapter of ``rank`` on ``targets``."""
        out = dict(self.group_ranks)
        for group, r in group_ranks([(rank, targets)]).items():
            out[group] = max(out.get(group, 0), r)
        return out

    def holds(self, rank: int, targets) -> bool:
        """Whether the layout has room for an adapter of ``rank`` on ``targets``."""
        return self.ranks_with(rank, targets) == self.group_ranks

    def add(self, name: str, rank: int, loader) -> None:
        """Register an adapter (the layout :meth:`holds` it): ``loader()`` returns its weights
        when first needed."""
        self.loaders[name] = loader
        self.ranks[name] = rank

    def remove(self, name: str) -> None:
        """Forget an adapter (its slot becomes free). The caller ensures nothing runs it."""
        future = self._reading.pop(name, None)
        if future is not None:
            future.cancel()
        self.resident.pop(name, None)
        self.owner.pop(name, None)
        self.pinned.discard(name)
        self._drop_host(name)
        self.loaders.pop(name, None)
        self.ranks.pop(name, None)

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
                or (len(self._reading) + 1) * self.layout.num_bytes > self.host_budget):
            return False
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="gpupool-adapter-read")
        # the loader and rank taken now: the reader touches nothing the engine thread
        # changes but the plans (whole values swapped under the GIL)
        self._reading[name] = self._reader.submit(self._pack, name, self.loaders[name],
                                                  self.ranks[name])
        return True

    def close(self) -> None:
        """Stop the background reader (the slots are being replaced or dropped)."""
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
        """The adapter's host copy in slot layout (``loader``, ``rank``: the registered ones,
        taken by the caller on the reader thread): from the file's bytes by a plan
        (:func:`pack_raw`) where the loader names an ordinary file and the slot is small
        enough for plans (PLAN_MAX_VALUES), else (and for any error, which it then reports)
        by :func:`pack_adapter`."""
        loader = self.loaders[name] if loader is None else loader
        rank = self.ranks[name] if rank is None else rank
        spec = getattr(loader, "spec", None)
        if spec is not None and self.layout.num_bytes // _elem(self.dtype) <= PLAN_MAX_VALUES:
            try:
                buf = self._pack_raw(spec, rank)
            except Exception:  # whatever it is, the reference path reports it
                logger.debug("packing %s from its bytes failed", name, exc_info=True)
                buf = None
            if buf is not None:
                return buf
        return pack_adapter(self.layout, self.cfg, rank, loader)

    def _pack_raw(self, spec, rank: int) -> torch.Tensor | None:
        raw = read_raw(spec.path)
        if raw is None:
            return None
        key = (raw.signature, rank)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)  # least recently used dropped first
        else:
            plan = PackPlan.build(self.layout, self.dtype, self.cfg, rank, raw, spec.path)
            self._plans[key] = plan
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)
        if plan.masks != spec.layers:
            return None
        return pack_raw(self.layout, self.dtype, plan, raw, spec.scaling)

    def _fill_mirror(self, slot: int) -> None:
        """Slot ``slot`` of the mirror from the slot: :func:`fill_mirror` by one gather."""
        if self._mirror_moves is None:
            self._mirror_moves = mirror_moves(self.cfg, self.group_ranks, self.layout,
                                              self.dtype)
        dst, src = self._mirror_moves
        row = self.buffer[slot].view(self.dtype)
        self._mirror_rows[slot].view(torch.bfloat16).index_copy_(
            0, dst, row.index_select(0, src).to(torch.bfloat16))

    def load_host(self, name: str) -> torch.Tensor:
        """The adapter's host copy, read from disk if the cache has none (AdapterError if
        the file is unreadable or holds non-finite weights); the LRU's least recent copies
        not on the device nor pinned are dropped past the byte budget."""
        buf = self.host.get(name)
        if buf is not None:
            self.host.move_to_end(name)
            return buf
        buf = self._read(name)
        self.num_reads += 1
        self.host[name] = buf
        self.host_bytes += buf.numel() * buf.element_size()
        for victim in [n for n in self.host if n != name]:
            if self.host_bytes <= self.host_budget:
                break
            if victim not in self.resident and victim not in self.pinned:
                self._drop_host(victim)
        return buf

    def _drop_host(self, name: str) -> None:
        buf = self.host.pop(name, None)
        if buf is not None:
            self.host_bytes -= buf.numel() * buf.element_size()

    def ensure(self, names, owners: dict | None = None,
               tenant_cap: int | None = None) -> dict[str, int]:
        """Slot of each name, loading missing ones into free or LRU slots; pins them all (the
        caller grows the slots first where a step holds more adapters than there are).
        ``owners``: the tenant each name is loaded for; with ``tenant_cap``, a tenant that
        holds that many slots already gets its own least recent one (so its adapters cannot
        push other tenants' out)."""
        if len(names) > self.num_slots:
            raise AdapterError(f"{len(names)} adapters in one step, {self.num_slots} slots")
        owners = owners or {}
        self.pinned = set(names)
        for name in names:  # a resident adapter is charged to the tenant using it now
            if name in self.resident:
                self.resident.move_to_end(name)
                if name in owners:
                    self.owner[name] = owners[name]
        for name in names:
            if name in self.resident:
                continue
            tenant = owners.get(name)
            used = set(self.resident.values())
            free = [s for s in range(self.num_slots) if s not in used]
            own = [n for n in self.resident
                   if self.owner.get(n) == tenant and n not in self.pinned]
            held = sum(self.owner.get(n) == tenant for n in self.resident)
            if tenant_cap is not None and held >= tenant_cap and own:
                slot = self._evict(own[0])
            elif free:
                slot = free[0]
            else:
                slot = self._evict(next(n for n in self.resident if n not in self.pinned))
            self.buffer[slot].copy_(self.load_host(name), non_blocking=True)
            if self.mirror is not None:
                self._fill_mirror(slot)
            self.resident[name] = slot
            self.owner[name] = tenant
            self.num_loads += 1
        return {n: self.resident[n] for n in names}

    def _evict(self, name: str) -> int:
        """Take the resident adapter ``name`` off the device; its slot."""
        self.owner.pop(name, None)
        return self.resident.pop(name)

    def check_integrity(self) -> None:
        slots = list(self.resident.values())
        assert len(slots) == len(set(slots)), "two adapters share a slot"
        assert all(0 <= s < self.num_slots for s in slots)
        assert set(self.resident) <= set(self.ranks), "a resident adapter is not registered"
        assert set(self.owner) == set(self.resident), "an owner recorded without a slot"
        assert set(self.host) <= set(self.ranks), "a host copy of an unregistered adapter"
        assert self.host_bytes == sum(b.numel() * b.element_size()
                                      for b in self.host.values()), "host bytes miscounted"
        assert set(self._reading) <= set(self.ranks), "a read of an unregistered adapter"
