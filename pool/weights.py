"""One flat buffer per model: every weight is a view at a fixed byte offset.

The layout is computed once from the model's config. Host and device copies of a model share
it, so making a model resident is one bulk copy of ``num_bytes`` plus :meth:`WeightLayout.views`.

    buffer (uint8, num_bytes)
    | embed_tokens | pad | layers.0.input_norm | pad | layers.0.qkv_weight | ... | norm |
    ^ offset 0           ^ aligned to ALIGN_BYTES
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN_BYTES = 256
SCALE_SUFFIX = "_scale"  # an int8 weight's per-row scales: "<name>_scale"
# a 4-bit weight's per-group float32 scales and offsets (kernels/quant4.py)
GSCALE_SUFFIX, GOFFSET_SUFFIX = "_gscale", "_goffset"
GCODE_SUFFIX = "_gcode"  # a 4-bit weight's codebook (MXFP4's e2m1 values), float32 [16]
PERM_SUFFIX = "_perm"  # a 4-bit weight's input column order (act-order GPTQ), int64 [K]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset_bytes: int
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class WeightLayout:
    """Where each named tensor of one model lives inside its flat buffer.

    ``dtype`` is the model's compute dtype. A weight named in ``int8`` is stored as int8
    (``name``) with one scale per output row in ``dtype`` (``name + "_scale"``, right after
    it): weight-only quantization, ``W[n, k] ~ int8[n, k] * scale[n]``. A weight named in
    ``int4`` (name -> group size) is stored as packed 4-bit values (uint8 [N, K / 2]) with a
    float32 scale and offset per group (``name + "_gscale"``, ``name + "_goffset"``, [N, K /
    group]): the format of ``kernels/quant4.py``.
    """

    dtype: torch.dtype
    specs: tuple[TensorSpec, ...]
    num_bytes: int

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
              int8: frozenset[str] | set[str] = frozenset(),
              fp32: frozenset[str] | set[str] = frozenset(),
              int4: dict[str, int] | None = None,
              perm: frozenset[str] | set[str] = frozenset(),
              codes: frozenset[str] | set[str] = frozenset()) -> WeightLayout:
        """``int8``: names stored int8 with a scale per row; ``fp32``: names kept in float32
        whatever ``dtype`` is (Gemma's norm weights); ``int4``: names stored 4-bit, with
        their group sizes; ``perm``: 4-bit names whose columns are stored in another order
        than x's (``name + "_perm"``: x's column of each, int64 [K]); ``codes``: 4-bit names
        whose values stand for a codebook's (``name + "_gcode"``, float32 [16]; no offsets)."""
        int4 = int4 or {}
        unknown = (set(int8) | set(int4)) - set(shapes)
        if unknown:
            raise ValueError(f"cannot quantize unknown weights {sorted(unknown)}")
        entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name, shape in shapes.items():
            if name in int4:
                n, k = shape
                g = int4[name]
                if k % g or g % 32:
                    raise ValueError(f"{name}: group {g} does not divide its {k} columns in "
                                     "blocks of 32")
                entries.append((name, (n, k // 2), torch.uint8))
                # a codebook weight's scales: MXFP4's exponent bytes (kernels/quant4.py)
                entries.append((name + GSCALE_SUFFIX, (n, k // g),
                                torch.uint8 if name in codes else torch.float32))
                if name not in codes:  # a codebook weight's offsets are zero: none stored
                    entries.append((name + GOFFSET_SUFFIX, (n, k // g), torch.float32))
                if name in perm:
                    entries.append((name + PERM_SUFFIX, (k,), torch.int64))
                if name in codes:
                    entries.append((name + GCODE_SUFFIX, (16,), torch.float32))
            elif name in int8:
                entries.append((name, tuple(shape), torch.int8))
                entries.append((name + SCALE_SUFFIX, (shape[0],), dtype))
            else:
                entries.append((name, tuple(shape), torch.float32 if name in fp32 else dtype))
        specs, offset = [], 0
        for name, shape, dt in entries:
            specs.append(TensorSpec(name, shape, offset, dt))
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return cls(dtype, tuple(specs), offset)

    def allocate(self, device: torch.device | str = "cpu", pin_memory: bool = False):
        """A new uninitialised flat buffer for this layout."""
        return torch.empty(self.num_bytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into ``buffer``; no copy. ``buffer`` must be uint8 of ``num_bytes``."""
        if buffer.dtype != torch.uint8 or buffer.numel() < self.num_bytes:
            raise ValueError(f"buffer must be uint8 with at least {self.num_bytes} bytes")
        out = {}
        for s in self.specs:
            elem = torch.empty((), dtype=s.dtype).element_size()
            raw = buffer[s.offset_bytes : s.offset_bytes + s.numel * elem]
            out[s.name] = raw.view(s.dtype).view(s.shape)
        return out
