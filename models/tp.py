"""Tensor parallelism (issue 35, first part): one model's weights sharded Megatron-style over
the ranks of a ``torch.distributed`` group, and the collectives of its forward pass.

Each rank holds a shard, read straight from the checkpoint (never the whole model):

- q, k, v (and their biases) and gate, up: column-parallel, each rank the rows of its heads
  (its q heads and their KV heads) and its share of the intermediate size;
- o and down: row-parallel, each rank the input columns of its heads / intermediate share;
  their outputs are partial sums, added over the ranks by one all-reduce each (in float32,
  rounded to the model's dtype once);
- the embedding and the lm_head: split by vocabulary; a token's embedding row lives on one
  rank (the others add zeros in the all-reduce) and each rank's logits columns are gathered
  into whole rows before anything reads them (sampler, logprobs, grammar masks);
- norms replicated, but OLMoE's whole-vector q/k norms: their weights cut as q's and k's
  rows, each row's sums of squares added over the ranks before it is normed
  (``LlamaModel._qk_norm_tp``; refused where KV heads are replicated);
- a mixture of experts' router replicated (every rank picks the same experts), each expert
  split as a dense MLP is (gate and up by output rows, down by input columns of its own
  intermediate size): the weighted expert outputs are partial sums, added over the ranks by
  one all-reduce after the layer's experts;
- gpt-oss: each rank its heads' attention sinks; a row-parallel product's bias (o's, each
  expert's down) kept by rank 0 alone (zeros elsewhere: the all-reduce adds it once); its
  stacked experts' [gate | up] rows (split so as they are read) cut as a fused gate_up's;
  MXFP4 experts (4-bit with the e2m1 codebook) cut between whole groups of 32, else refused
  (``_in_columns``).

The rank's model is a :class:`~gpupool.models.llama.LlamaModel` of the *local* config
(:func:`local_config`: its heads, KV heads, intermediate size and vocabulary), so attention and
the KV pages are the single-rank code on the rank's heads: a page holds the rank's KV heads,
page ids are the same on every rank. With fewer KV heads than ranks each rank keeps the one
KV head its q heads read (replicated). A model whose counts do not divide is refused with
the counts named (``ModelConfig.tp_refusal``).

Sums: a row-parallel product's partial sums are added across ranks, so logits match the
single-rank model's to rounding (float32: within 1e-4 of the largest logit, tested), not bit
for bit; a TP group's requests fail over only to groups of the same degree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpupool.models.config import ModelConfig
from gpupool.models.errors import ModelLoadError
from gpupool.models.quantized import Int4

TIMEOUT_S = 120.0  # a rank that keeps the others waiting longer is taken for dead


def _shared_file(prefix: str, size: int) -> str:
    """A new zeroed file of ``size`` bytes for the ranks to map (in /dev/shm where there is
    one); its path."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix=prefix,
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.ftruncate(fd, size)
    os.close(fd)
    return path


class ShmExchange:
    """The ranks of one host swap tensors through a shared file in /dev/shm: each rank
    writes its tensor into its slot, then publishes a sequence number; a rank reads the
    others' slots once their numbers match its own (x86 keeps stores, and loads, in program
    order). Two slots a rank, used alternately: a rank cannot be two exchanges ahead of
    another, so a slot is never rewritten while a rank still reads it. A wait spins (the
    ranks run on their own cores), then yields. ``path``: made by :meth:`create`."""

    FLAGS = 4096  # bytes of sequence numbers (one 64-byte line a rank) before the slots

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int):
        self.path, self.rank, self.world, self.slot_bytes = path, rank, world, slot_bytes
        size = self.FLAGS + 2 * world * slot_bytes
        self.buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self.flags = self.buf[: self.FLAGS].view(torch.int64)  # rank r: flags[8 r]
        self.seq = 0
        self.alive = None  # () -> whether the peers live (a wait fails once they do not)
        self.timeout_s = TIMEOUT_S  # a wait's limit (the native step's exchanges' too)

    @classmethod
    def create(cls, world: int, slot_bytes: int) -> str:
        """A new zeroed exchange file's path."""
        return _shared_file("gpupool-tp-", cls.FLAGS + 2 * world * slot_bytes)

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * 4 <= self.slot_bytes

    def _slot(self, rank: int, seq: int, numel: int) -> torch.Tensor:
        start = self.FLAGS + ((seq % 2) * self.world + rank) * self.slot_bytes
        return self.buf[start : start + 4 * numel].view(torch.float32)

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's float32 ``t`` (flattened), in rank order."""
        self.seq += 1
        n = t.numel()
        self._slot(self.rank, self.seq, n).copy_(t.reshape(-1))
        self.flags[8 * self.rank] = self.seq
        _wait(lambda: all(int(self.flags[8 * r]) >= self.seq for r in range(self.world)),
              self.alive, self.timeout_s, spins=20000)
        return [self._slot(r, self.seq, n) for r in range(self.world)]


class ShmCommands:
    """Rank 0's commands to the other ranks through a shared file: a pickled message and
    its length behind a sequence number (``CMD_BYTES`` at most; a longer one goes through
    gloo, the header saying so); each rank acknowledges a message once read, and rank 0
    writes the next one only when all have (one message in flight). A rank waiting for the
    next command spins a while, then sleeps in short naps (an idle engine burns no core)."""

    CMD_BYTES = 8 << 20
    HEADER = 4096  # int64s: [0] seq, [1] bytes (-1: gloo), [8 r] rank r's last read seq

    def __init__(self, path: str, rank: int, world: int = 2):
        self.rank, self.world = rank, world
        self.buf = torch.from_file(path, shared=True, size=self.HEADER + self.CMD_BYTES,
                                   dtype=torch.uint8)
        self.header = self.buf[: self.HEADER].view(torch.int64)
        self.seq = 0
        self.alive = None  # () -> whether the peers live

    @classmethod
    def create(cls) -> str:
        """A new zeroed command file's path."""
        return _shared_file("gpupool-tp-cmd-", cls.HEADER + cls.CMD_BYTES)

    def send(self, msg) -> None:
        """``msg`` to every other rank: pickled, but for its CPU tensors, whose bytes go
        behind the pickle as they are (:class:`_TensorPickler`: a step's ForwardBatch
        pickles in ~0.4-0.8 ms the torch way, its integers' bytes copy in microseconds)."""
        tensors: list = []
        data = _TensorPickler.dumps(msg, tensors)
        base = _aligned(len(data))  # the tensors' bytes from here, each 64-aligned
        size = base + (tensors[-1][0] + _nbytes(tensors[-1][1]) if tensors else 0)
        _wait(lambda: all(int(self.header[8 * r]) >= self.seq for r in range(1, self.world)),
              self.alive, TIMEOUT_S)
        self.seq += 1
        big = size > self.CMD_BYTES
        if not big:
            start = self.HEADER
            self.buf[start : start + len(data)].copy_(torch.frombuffer(data, dtype=torch.uint8))
            for off, t in tensors:
                n = _nbytes(t)
                if n:
                    self.buf[start + base + off : start + base + off + n].copy_(
                        t.reshape(-1).view(torch.uint8))
        self.header[1] = -1 if big else len(data)
        self.header[0] = self.seq  # last: the message is whole
        if big:
            import torch.distributed as dist

            dist.broadcast_object_list([msg], src=0)

    def receive(self):
        self.seq += 1
        _wait(lambda: int(self.header[0]) >= self.seq, self.alive)  # idle: no timeout
        n = int(self.header[1])
        if n < 0:
            import torch.distributed as dist

            box = [None]
            dist.broadcast_object_list(box, src=0)
            msg = box[0]
        else:
            data = self.buf[self.HEADER : self.HEADER + n].numpy().tobytes()
            msg = _TensorUnpickler.loads(data, self.buf, self.HEADER + _aligned(n))
        self.header[8 * self.rank] = self.seq  # read: rank 0 may write the next one
        return msg


def _aligned(n: int) -> int:
    """``n`` rounded up to a multiple of 64 (where a command's next part starts)."""
    return -(-n // 64) * 64


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _TensorPickler:
    """A pickle whose CPU tensors are left out, each replaced by (dtype, shape, offset) of
    its bytes in a region written behind it (``tensors``: (offset, contiguous tensor))."""

    @staticmethod
    def dumps(msg, tensors: list) -> bytearray:
        import io
        import pickle

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                    return None
                t = obj.detach().contiguous()
                off = _aligned(tensors[-1][0] + _nbytes(tensors[-1][1])) if tensors else 0
                tensors.append((off, t))
                return ("t", str(t.dtype).removeprefix("torch."), tuple(t.shape), off)

        f = io.BytesIO()
        P(f, protocol=pickle.HIGHEST_PROTOCOL).dump(msg)
        return bytearray(f.getbuffer())


class _TensorUnpickler:
    @staticmethod
    def loads(data: bytes, buf: torch.Tensor, base: int):
        """:class:`_TensorPickler`'s message; its tensors copied out of ``buf`` (whose bytes
        the next message overwrites) from ``base`` on."""
        import io
        import math
        import pickle

        class U(pickle.Unpickler):
            def persistent_load(self, pid):
                _, dtype, shape, off = pid
                dtype = getattr(torch, dtype)
                n = math.prod(shape) * dtype.itemsize
                return buf[base + off : base + off + n].clone().view(dtype).view(shape)

        return U(io.BytesIO(data)).load()


def _wait(ready, alive=None, timeout_s: float | None = None, spins: int = 200000) -> None:
    """Until ``ready()``: spinning first, then naps of half a millisecond; RuntimeError once
    ``alive()`` (asked every ~0.1 s of napping) says a peer is gone, or after ``timeout_s``."""
    import time

    n, start = 0, None
    while not ready():
        n += 1
        if n > spins:
            time.sleep(0.0005)
            if n % 200 == 0:
                start = start or time.monotonic()
                if alive is not None and not alive():
                    raise RuntimeError("a tensor-parallel rank is gone")
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise RuntimeError(f"a tensor-parallel rank did not answer in "
                                       f"{timeout_s:.0f} s")


@dataclasses.dataclass
class TPGroup:
    """This process's place in a tensor-parallel group (``group``: its torch.distributed
    process group, None for the default one; ``shm``: the host's shared-memory exchange,
    used for every tensor that fits its slots, gloo for the rest)."""
    rank: int
    world: int
    group: object = None
    shm: ShmExchange | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks, added in float32 in rank order (the same bits on
        every rank) and rounded to t's dtype once."""
        if self.shm is not None and self.shm.fits(t):
            parts = self.shm.exchange(t.float())
            s = parts[0].clone()
            for p in parts[1:]:
                s += p
            return s.view(t.shape).to(t.dtype)
        import torch.distributed as dist

        s = t.float() if t.dtype != torch.float32 else t.clone()
        dist.all_reduce(s, group=self.group)
        return s.to(t.dtype)

    def gather_columns(self, t: torch.Tensor) -> torch.Tensor:
        """Each rank's ``t`` [..., C] side by side in rank order: [..., world * C]."""
        if self.shm is not None and self.shm.fits(t) and t.dtype == torch.float32:
            parts = self.shm.exchange(t)
            return torch.cat([p.view(t.shape) for p in parts], dim=-1)
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's shard (its heads, KV heads, intermediate size, vocabulary);
    ModelLoadError naming the counts ``world`` ranks cannot split (``tp_refusal``)."""
    why = cfg.tp_refusal(world)
    if why is not None:
        raise ModelLoadError(why)
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // world,
        num_kv_heads=max(cfg.num_kv_heads // world, 1),
        intermediate_size=cfg.intermediate_size // world,
        moe_intermediate_size=cfg.moe_intermediate_size // world,
        vocab_size=cfg.vocab_size // world)


def _rows(t: torch.Tensor, size: int, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s block of ``size // world`` rows of ``t`` (``size`` rows)."""
    n = size // world
    return t[rank * n : (rank + 1) * n]


def _kv_rows(cfg: ModelConfig, t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """A k or v projection's rows for the rank: its share of the KV heads, or (fewer KV heads
    than ranks) the one KV head its q heads read."""
    if cfg.num_kv_heads >= world:
        return _rows(t, cfg.kv_size, world, rank)
    head = rank // (world // cfg.num_kv_heads)
    return t[head * cfg.head_dim : (head + 1) * cfg.head_dim]


def _out_rows(cfg: ModelConfig, proj: str, t: torch.Tensor, world: int, rank: int,
              inter: int | None = None) -> torch.Tensor:
    """The rank's output rows of a column-parallel projection (q, k, v, gate, up; ``inter``:
    an expert's intermediate size, the dense MLP's by default): of its weight, or of an
    adapter's B."""
    if proj == "q_proj":
        return _rows(t, cfg.q_size, world, rank)
    if proj in ("k_proj", "v_proj"):
        return _kv_rows(cfg, t, world, rank)
    return _rows(t, inter or cfg.intermediate_size, world, rank)


def _in_columns(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """The rank's input columns of a row-parallel projection (o, down): of its weight (a
    4-bit checkpoint's too: whole groups), or of an adapter's A."""
    n = t.shape[1] // world
    if isinstance(t, Int4):  # (MXFP4's groups of 32, which no config names, checked here)
        try:
            return t.columns(rank * n, (rank + 1) * n)
        except ValueError as e:
            raise ModelLoadError(f"a 4-bit weight cannot be split over {world} ranks: "
                                 f"{e}") from None
    return t[:, rank * n : (rank + 1) * n]


def _cat(parts: list):
    return Int4.cat(parts) if isinstance(parts[0], Int4) else torch.cat(parts)


def shard(cfg: ModelConfig, name: str, src: str, t: torch.Tensor, world: int,
          rank: int) -> torch.Tensor:
    """The rank's part of checkpoint tensor ``src`` (which makes our ``name``)."""
    kind = src.rsplit(".", 2)[-2] if src.endswith((".weight", ".bias")) else ""
    if name.endswith(("qkv_weight", "qkv_bias")):
        if kind == "qkv_proj":  # fused (Phi-3): each part's rows
            q, k, v = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            return _cat([_out_rows(cfg, p, x, world, rank)
                         for p, x in (("q_proj", q), ("k_proj", k), ("v_proj", v))])
        return _out_rows(cfg, "q_proj" if kind == "q_proj" else "k_proj", t, world, rank)
    if name.endswith(("gate_up_weight", "gate_up_bias")):  # a dense MLP's, or an expert's
        inter = cfg.moe_intermediate_size if ".experts." in name else cfg.intermediate_size
        if kind == "gate_up_proj" or src.endswith("]"):  # fused (gpt-oss's stacked experts
            # too, split into [gate | up] as read): gate's rows, then up's
            return _cat([_out_rows(cfg, "gate_proj", x, world, rank, inter)
                         for x in t.chunk(2)])
        return _out_rows(cfg, "gate_proj", t, world, rank, inter)
    if name.endswith(("o_weight", "down_weight")):  # row-parallel: the input columns
        return _in_columns(t, world, rank)
    if name.endswith(("o_bias", "down_bias")):  # a row-parallel product's bias: added once,
        return t if rank == 0 else torch.zeros_like(t)  # by rank 0 (the sum adds the rest)
    if name.endswith("sinks"):  # gpt-oss's sink logit a head: the rank's heads'
        return _rows(t, cfg.num_heads, world, rank)
    if name in ("embed_tokens", "lm_head"):
        return _rows(t, cfg.vocab_size, world, rank)
    if cfg.qk_norm_whole and name.endswith(("q_norm", "k_norm")):  # OLMoE: a weight a row
        return _out_rows(cfg, "q_proj" if name.endswith("q_norm") else "k_proj", t, world,
                         rank)
    return t


def shard_adapter(cfg: ModelConfig, weights: dict, world: int, rank: int) -> dict:
    """Rank ``rank``'s part of an adapter's weights {(layer, projection): (A, B)} (fused
    projections already split), cut as the projection's weight is: a column-parallel
    projection's B to the rank's output rows (A whole: every rank shrinks the same input); a
    row-parallel one's (o, down) A to the rank's input columns (B whole: the shrink's partial
    sums are added over the ranks before the expand, ``adapters.batch.LoraBatch.reduce``).
    A mixture's experts are cut as their weights: an expert's gate_up B to the rank's gate
    rows and up rows, its down A to the rank's input columns (B whole: each rank adds B times
    its partial shrink to its partial output, which the layer's one all-reduce sums)."""
    out = {}
    for (layer, proj), (a, b) in weights.items():
        if proj in ("o_proj", "down_proj") or proj.endswith(".down_proj"):
            a = _in_columns(a, world, rank)
        elif proj.endswith(".gate_up_proj"):  # an expert's gate rows, then its up rows
            b = _cat([_out_rows(cfg, "gate_proj", x, world, rank, cfg.moe_intermediate_size)
                      for x in b.chunk(2)])
        else:
            b = _out_rows(cfg, proj, b, world, rank)
        out[layer, proj] = (a.contiguous(), b.contiguous())
    return out


class RankAdapters:
    """A rank's adapters of one sharded model (ranks 1 .. world - 1; rank 0's live in its
    ``LoadedModel``): each read from its file by the rank itself when a step first needs it
    and cut to the rank's part (:func:`shard_adapter`), in pages of this rank's own
    (``adapters.paged.AdapterPages`` over the local config and a page pool of host memory,
    grown when a step holds more than it has). The step carries adapter names, never pages."""

    PAGE_BYTES = 1 << 20

    def __init__(self, cfg: ModelConfig, local: ModelConfig, dtype: torch.dtype,
                 world: int, rank: int, mirror: bool = False):
        """``mirror``: pieces with a bf16 part for the fused CPU kernel (as rank 0's)."""
        self.cfg, self.local, self.dtype = cfg, local, dtype
        self.world, self.rank, self.mirror = world, rank, mirror
        self.pages = None
        self.targets: dict[str, tuple[str, ...]] = {}

    def _make(self, groups, num_pages: int, host_bytes: int):
        from gpupool.adapters.paged import AdapterPages
        from gpupool.pool.pages import PagePool

        memory = torch.zeros(num_pages, self.PAGE_BYTES, dtype=torch.uint8)
        return AdapterPages(self.local, groups, self.dtype, PagePool(num_pages), memory,
                            "rank", mirror=self.mirror, host_bytes=host_bytes)

    def _remake(self, groups, num_pages: int) -> None:
        old = self.pages
        self.pages = self._make(groups, num_pages, old.host_budget)
        self.pages.adopt(old)

    def add(self, name: str, spec, targets: tuple[str, ...], groups, host_bytes: int) -> None:
        """Register ``spec``'s file as ``name``; ``groups``: rank 0's layout after it (every
        rank holds the same groups)."""
        from gpupool.adapters.peft_format import load_peft_weights

        if self.pages is None:
            self.pages = self._make(set(groups), 1, host_bytes)
        elif self.pages.groups != set(groups):
            self._remake(set(groups), self.pages.pool.num_pages)
        cfg, world, rank = self.cfg, self.world, self.rank
        self.pages.add(name, spec.rank, lambda: shard_adapter(
            cfg, load_peft_weights(spec, cfg), world, rank))
        self.targets[name] = targets

    def remove(self, name: str) -> None:
        """Forget ``name``; with the last one gone the pages go too (as rank 0's)."""
        if self.pages is not None:
            self.pages.remove(name)
            if not self.pages.ranks:
                self.pages.release()
                self.pages = None
        self.targets.pop(name, None)

    def batch(self, runs: list, ops, reduce):
        """The step's LoraBatch on this rank (``runs``: (adapter or None, rows) in row order,
        :func:`adapter_runs`)."""
        from gpupool.adapters.batch import LoraBatch

        rows = [name for name, n in runs for _ in range(n)]
        names = list(dict.fromkeys(n for n in rows if n))
        need = sum(self.pages.pages_needed(n) for n in names)
        if need > self.pages.pool.num_pages:  # as many as rank 0's step holds
            self._remake(self.pages.groups, max(need, 2 * self.pages.pool.num_pages))
        self.pages.pool.set_pinned(())  # nothing runs between steps on a rank
        tables = self.pages.ensure(names)
        return LoraBatch.build(rows, tables, self.pages, self.targets, torch.device("cpu"),
                               ops, batched=self.mirror, reduce=reduce)


def adapter_runs(rows) -> list:
    """The step's (adapter or None, token rows) runs from its BatchRows, in row order: the
    step's command carries a run per segment, not a name per token row."""
    runs: list = []
    for item in rows:
        if runs and runs[-1][0] == item.adapter:
            runs[-1][1] += len(item.token_ids)
        else:
            runs.append([item.adapter, len(item.token_ids)])
    return runs


def load_shard(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, world: int,
               rank: int, quantization: str | None = None):
    """(the local config, its layout, a host buffer holding rank ``rank``'s shard): each
    checkpoint tensor read once, cut to the rank's part, stored (quantized where asked)."""
    from gpupool.models import loader

    local = local_config(cfg, world)
    return local, *loader.load_flat_weights(folder, local, dtype, quantization,
                                            cut=lambda name, src, t: shard(cfg, name, src, t,
                                                                           world, rank))
