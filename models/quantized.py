"""4-bit checkpoints read as they come, into gpupool's 4-bit format (``kernels/quant4.py``).

``config.json``'s ``quantization_config`` says which (``models.config.checkpoint_quant``):

- **GPTQ** (``quant_method: gptq``, 4 bits): per linear layer ``qweight`` int32 [K / 8, N]
  (column k of output n: bits ``4 (k % 8)`` of ``qweight[k // 8, n]``), ``qzeros`` int32
  [groups, N / 8] (likewise along N), ``scales`` float16 [groups, N] and ``g_idx`` [K] (each
  input column's group). ``W[n, k] = (q - z) s`` of the column's group, where z is the stored
  zero plus 1 in the original format (``checkpoint_format: gptq``; ``gptq_v2`` stores it
  as it is). With act-order (``desc_act``) the groups are scattered over the columns: the
  columns are reordered so each group is contiguous and the product permutes x likewise
  (``<name>_perm``); the projections that share an input (q, k, v; gate, up) must share the
  order, which GPTQ gives them (the same input's Hessian orders each).
- **AWQ** (``quant_method: awq``, ``version: gemm``, with zero points): ``qweight`` int32
  [K, N / 8] packed along N in AWQ's order (nibble i holds column ``(0, 2, 4, 6, 1, 3, 5,
  7)[i]`` of its eight), ``qzeros`` [groups, N / 8] likewise, ``scales`` [groups, N];
  ``W[n, k] = (q - z) s``.
- **gpupool's own** (``quant_method: gpupool_int4``: what a GGUF Q4_0 / Q4_K file converts
  to, ``models/gguf.py``): ``<name>.qweight4`` (packed uint8 [N, K / 2]), ``.scales4`` and
  ``.offsets4`` (float32 [N, K / G]).

Each becomes scale ``s`` and offset ``-z s`` per group: exact (``(q - z) s`` and ``q s - z s``
are the same float32 number: both products are exact, so the sum rounds to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpupool.kernels import quant4
from gpupool.models.config import INT4_PARTS as PARTS
from gpupool.models.config import OWN_INT4 as OWN
from gpupool.models.errors import ModelLoadError

AWQ_COLUMN_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a packed eight is nibble [j]


@dataclass
class Int4:
    """One checkpoint tensor's 4-bit form: packed q [N, K / 2], float32 scale and offset
    [N, K / G]; ``perm`` [K]: the input columns' order (act-order GPTQ), or None; ``code``:
    the codebook its values stand for (float32 [16], MXFP4's), or None."""
    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    perm: torch.Tensor | None = None
    code: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], 2 * self.q.shape[1]

    @property
    def group(self) -> int:
        return quant4.group_size(self.q, self.scale)

    def dim(self) -> int:
        return 2

    def map_rows(self, fn) -> Int4:
        """The same weight with ``fn`` applied to its rows (each part's)."""
        return Int4(fn(self.q), fn(self.scale), fn(self.offset), self.perm, self.code)

    def __getitem__(self, rows: slice) -> Int4:
        """Output rows ``rows`` (a tensor-parallel rank's, models/tp.py)."""
        return self.map_rows(lambda t: t[rows])

    def split(self, sizes: list[int]) -> list[Int4]:
        """Consecutive blocks of ``sizes`` output rows (a fused projection's parts)."""
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self[a : a + n] for a, n in zip(starts, sizes)]

    def chunk(self, n: int) -> list[Int4]:
        return self.split([self.shape[0] // n] * n)

    def columns(self, start: int, stop: int) -> Int4:
        """Input columns [start, stop) (multiples of the group size; not act-order)."""
        group = self.group
        if self.perm is not None or start % group or stop % group:
            raise ValueError(f"4-bit columns {start}:{stop} cut groups of {group}"
                             + (" (act-order)" if self.perm is not None else ""))
        return Int4(self.q[:, start // 2 : stop // 2].contiguous(),
                    self.scale[:, start // group : stop // group].contiguous(),
                    self.offset[:, start // group : stop // group].contiguous(),
                    code=self.code)

    @staticmethod
    def cat(parts: list[Int4]) -> Int4:
        """Row blocks stacked (one column order)."""
        return Int4(*(torch.cat([getattr(p, f) for p in parts])
                      for f in ("q", "scale", "offset")), parts[0].perm, parts[0].code)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the checkpoint's column order."""
        w = quant4.dequantize(self.q, self.scale, self.offset, code=self.code)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> Int4:
    """MXFP4 ``blocks`` [N, G, 16] (uint8: two e2m1 codes a byte, the low nibble first) with
    ``scales`` [N, G] (uint8: the block's exponent + 127) as a 4-bit weight of codebook
    ``quant4.E2M1``: the codes in our block order, its scales the file's exponent bytes
    (uint8: 2^(e - 127), ``quant4.scale_values``), offset 0. Exact: each value is a code's
    value times a power of two."""
    n, g = scales.shape
    b = blocks.reshape(n, g, 16)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(n, g * 32)
    return Int4(quant4.pack(codes), scales.reshape(n, g).contiguous(), torch.zeros(n, g),
                code=torch.tensor(quant4.E2M1, dtype=torch.float32))


def mxfp4_values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of MXFP4 ``blocks`` [..., G, 16] with ``scales`` [..., G]: [..., G * 32],
    what :func:`mxfp4` keeps, de-quantized (its test against transformers' de-quantization
    is that of the form the loader stores)."""
    g = scales.shape[-1]
    w = mxfp4(blocks.reshape(-1, g, 16), scales.reshape(-1, g)).dequantize()
    return w.reshape(*scales.shape[:-1], g * 32)


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> its eight 4-bit fields [..., C, 8] (field i: bits 4 i .. 4 i + 3)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (t.to(torch.int32)[..., None] >> shifts) & 15


def group_of(k: int, quant: dict) -> int:
    """The group size of a layer of ``k`` input columns (-1 in the config: one group)."""
    return k if quant["group"] == -1 else quant["group"]


def gptq(qweight, qzeros, scales, g_idx, quant: dict) -> Int4:
    """A GPTQ layer's tensors (see the module docstring) in gpupool's 4-bit form."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)  # [K, N]
    z = _nibbles(qzeros).reshape(qzeros.shape[0], -1)[:, :n] + quant["zero_plus"]  # [G, N]
    s = scales.float()  # [groups, N]
    group = group_of(k, quant)
    perm = None
    if g_idx is not None:
        g_idx = g_idx.long()
        if not torch.equal(g_idx, torch.arange(k) // group):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k) // group):
                raise ModelLoadError("GPTQ g_idx does not give every group its "
                                     f"{group} columns")
            q = q[perm]
    if s.shape != (k // group, n) or z.shape != s.shape:
        raise ModelLoadError(f"GPTQ scales {tuple(s.shape)} / qzeros do not fit a [{k}, {n}] "
                             f"weight in groups of {group}")
    zeros = z.float()
    return Int4(quant4.pack(q.T.contiguous()), s.T.contiguous(),
                (-(zeros * s)).T.contiguous(), perm)


def awq(qweight, qzeros, scales, quant: dict) -> Int4:
    """An AWQ (gemm) layer's tensors in gpupool's 4-bit form."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    order = torch.tensor(AWQ_COLUMN_NIBBLE)
    q = _nibbles(qweight)[..., order].reshape(k, n)
    z = _nibbles(qzeros)[..., order].reshape(qzeros.shape[0], n)
    s = scales.float()
    group = group_of(k, quant)
    if s.shape != (k // group, n) or z.shape != s.shape:
        raise ModelLoadError(f"AWQ scales {tuple(s.shape)} / qzeros do not fit a [{k}, {n}] "
                             f"weight in groups of {group}")
    return Int4(quant4.pack(q.T.contiguous()), s.T.contiguous(),
                (-(z.float() * s)).T.contiguous())


def layer_parts(name: str, quant: dict) -> tuple[str, ...] | None:
    """The checkpoint names holding ``name`` (``....weight``) 4-bit, None if ``quant`` is
    none (the optional g_idx included: the caller skips absent ones)."""
    if not quant or not name.endswith(".weight"):
        return None
    base = name[: -len(".weight")]
    return tuple(base + p for p in PARTS[quant["method"]])


def read_int4(get, name: str, quant: dict, present) -> Int4 | None:
    """``name`` as the checkpoint's 4-bit tensors (``get``: a reader of checkpoint names;
    ``present``: whether the checkpoint holds a name), or None where it holds it otherwise."""
    parts = layer_parts(name, quant)
    if parts is None or not present(parts[0]):
        return None
    method = quant["method"]
    if method == OWN:
        return Int4(*(get(p) for p in parts))
    if method == "awq":
        return awq(*(get(p) for p in parts), quant)
    return gptq(*(get(p) for p in parts[:3]), get(parts[3]) if present(parts[3]) else None,
                quant)
