"""Group-wise 4-bit weights: the format, its torch reference and its conversions.

A weight ``W`` [N, K] is stored as

- ``q``: uint8 [N, K / 2], two 4-bit values (0..15) a byte, in blocks of 32 columns: byte
  ``j`` (0..15) of block ``b`` holds column ``32 b + j`` in its low nibble and column
  ``32 b + 16 + j`` in its high nibble (llama.cpp's Q4_0 order, so a block unpacks into two
  vectors of 16 with one mask and one shift);
- ``scale`` and ``offset``: float32 [N, K / G], one pair per group of ``G`` columns (a multiple
  of 32 dividing K),

meaning ``W[n, k] = q[n, k] * scale[n, g] + offset[n, g]`` with ``g = k // G``, computed in
float32 as two operations (a product, then a sum: every kernel rounds alike). The offset
makes each published format exact: GGUF's Q4_0 ``d (q - 8)`` is scale ``d``, offset ``-8 d``;
Q4_K's ``d sc q - dmin m`` is scale ``d sc``, offset ``-dmin m`` (group 32); AWQ's and
GPTQ's ``(q - z) s`` is scale ``s``, offset ``-z s`` (each product of a 16-bit float and a
small integer is exact in float32).

A weight may carry a **codebook** ``code`` (float32 [16]): its 4-bit values then stand for
``code[q]`` rounded to bf16, ``W[n, k] = bf16(code[q[n, k]]) * scale[n, g] + offset[n, g]``.
MXFP4 (gpt-oss's experts) is codebook :data:`E2M1` (exact in bf16) with the block's power of
two as its scale and offset 0: exact, kept 4-bit (the file's codes, re-ordered into blocks;
its scales as the file's exponent bytes, ``scale`` uint8: 2^(e - 127); no offsets).

A product reads the weight as its float32 values: ``y = x @ W.T`` summed in float32 and
rounded to x's dtype once, then the bias added (:func:`linear_int4_reference`; the native
GEMV and the Triton kernel compute the same sums in their own fixed order).
"""

from __future__ import annotations

import torch

BLOCK = 32  # columns a packed block holds (16 bytes)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,  # MXFP4's 4-bit floats: sign, 2 + 1 bits
        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUPS = (32, 64, 128)  # the group sizes gpupool's own quantization takes


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] of values ``q`` [N, K] in 0..15 (K a multiple of 32), in the block
    order of the module docstring."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"4-bit columns must be a multiple of {BLOCK}, not {k}")
    b = q.to(torch.uint8).view(n, k // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The values [N, K] (uint8, 0..15) of a packed [N, K / 2]."""
    n, half = packed.shape
    b = packed.view(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack((b & 15, b >> 4), dim=2).reshape(n, 2 * half)


def group_size(q: torch.Tensor, scale: torch.Tensor) -> int:
    return 2 * q.shape[1] // scale.shape[1]


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 group scales: as they are, or (uint8) MXFP4's exponent bytes e, 2^(e - 127)."""
    if scale.dtype != torch.uint8:
        return scale
    return torch.ldexp(torch.ones(scale.shape, device=scale.device),
                       scale.to(torch.int32) - 127)


def codebook(code: torch.Tensor) -> torch.Tensor:
    """The values a codebook's 4-bit values stand for (float32 [16]: rounded to bf16)."""
    return code.to(torch.bfloat16).float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               rows: torch.Tensor | None = None, code: torch.Tensor | None = None
               ) -> torch.Tensor:
    """float32 [N, K] (or the rows ``rows`` of it): ``q * scale + offset`` per group (q's
    ``code`` value for q, where it has a codebook; ``offset`` None: zero, a codebook
    weight's)."""
    if rows is not None:
        q, scale = q[rows], scale[rows]
        offset = None if offset is None else offset[rows]
    g = group_size(q, scale)
    v = unpack(q)
    v = v.float() if code is None else codebook(code)[v.long()]
    v = v.view(q.shape[0], -1, g)
    w = v * scale_values(scale)[:, :, None]
    return (w if offset is None else w + offset[:, :, None]).view(q.shape[0], -1)


def choose_group(k: int, group: int) -> int | None:
    """The group size a weight of ``k`` columns takes under a requested ``group``: that one
    where it divides k, else 32 (SmolLM2's 576 columns are not a multiple of 128); None where
    k is not a multiple of 32 (the weight stays in the model's dtype)."""
    if k % group == 0:
        return group
    return BLOCK if k % BLOCK == 0 else None


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed q, scale, offset) of ``w`` [N, K]: each group's minimum as its offset and
    (max - min) / 15 as its scale (1 for a constant group), q rounded to nearest and clamped;
    every weight is within half a scale of its value."""
    n, k = w.shape
    if k % group or group % BLOCK:
        raise ValueError(f"group {group} must be a multiple of {BLOCK} dividing {k}")
    wf = w.float().view(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((wf - lo[..., None]) / s[..., None]).clamp_(0, 15)
    return pack(q.view(n, k)), s.contiguous(), lo.contiguous()


def linear_int4_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          offset: torch.Tensor | None, bias: torch.Tensor | None = None,
                          product=None, code: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the 4-bit weight (q, scale, offset; its codebook ``code``):
    the float32 weight's product with x in float32 (``product``: the product to use, default
    torch's), rounded to x's dtype once, then the bias added in x's dtype."""
    w = dequantize(q, scale, offset, code=code)
    xf = x.float()
    y = (product(xf, w) if product is not None else xf @ w.T).to(x.dtype)
    return y if bias is None else y + bias
