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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class WeightLayout:
    """Where each named tensor of one model lives inside its flat buffer."""

    dtype: torch.dtype
    specs: tuple[TensorSpec, ...]
    num_bytes: int

    @classmethod
    def build(cls, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> WeightLayout:
        elem = torch.empty((), dtype=dtype).element_size()
        specs, offset = [], 0
        for name, shape in shapes.items():
            specs.append(TensorSpec(name, tuple(shape), offset))
            nbytes = math.prod(shape) * elem
            offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return cls(dtype, tuple(specs), offset)

    def allocate(self, device: torch.device | str = "cpu", pin_memory: bool = False):
        """A new uninitialised flat buffer for this layout."""
        return torch.empty(self.num_bytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into ``buffer``; no copy. ``buffer`` must be uint8 of ``num_bytes``."""
        if buffer.dtype != torch.uint8 or buffer.numel() < self.num_bytes:
            raise ValueError(f"buffer must be uint8 with at least {self.num_bytes} bytes")
        elem = torch.empty((), dtype=self.dtype).element_size()
        out = {}
        for s in self.specs:
            raw = buffer[s.offset_bytes : s.offset_bytes + s.numel * elem]
            out[s.name] = raw.view(self.dtype).view(s.shape)
        return out
