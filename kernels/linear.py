"""``linear(x, weight, bias)``: ``F.linear`` semantics, with oneDNN's fp32/bf16 path on CPU.

Semantics: ``y = x @ weight.T + bias``; x: [..., K], weight: [N, K] (may be a view into a flat
weight buffer), bias: [N] or None.

On CPU, oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``) runs the skinny
matmuls of decoding 1.7-2.6x faster than ``F.linear`` on the project's machine (measured at
batch 16 on SmolLM2 shapes: 960x576 123 -> 69 us, 49152x576 11.8 -> 4.5 ms), with plain
(unpacked) weights, so weights stay views into the model's flat buffer. It is a private op:
it is used only for a dtype where a probe at first use agrees with ``F.linear``; otherwise
``F.linear``.
Tiny products (under ONEDNN_MIN_MACS multiply-adds, e.g. a LoRA segment of one row) go to
``F.linear``: oneDNN's call overhead is ~14 us there against ~4 us (measured, 1x576 @ 576x48).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_STATE: dict[torch.dtype, bool] = {}  # dtype -> oneDNN's linear works and agrees
ONEDNN_MIN_MACS = 1 << 16
_DTYPES = (torch.float32, torch.bfloat16)
_PROBE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _probed(cache: dict, dtype: torch.dtype, what: str, check) -> bool:
    """``check()`` once per dtype, remembered in ``cache``; False (logged) if it raises."""
    if dtype not in cache:
        try:
            cache[dtype] = bool(check())
        except (RuntimeError, AttributeError) as e:
            logger.info("%s unavailable for %s (%s)", what, dtype, e)
            cache[dtype] = False
    return cache[dtype]


def _force(cache: dict, enabled: bool | None) -> None:
    """Forget ``cache``'s probes; ``enabled=False`` turns the path off for every dtype."""
    cache.clear()
    if enabled is False:
        cache.update(dict.fromkeys(_DTYPES, False))


def _onednn_ok(dtype: torch.dtype) -> bool:
    """Probe once per dtype: oneDNN may lack a dtype on a CPU (bf16 without avx512 on an AMD
    machine raises "could not create a primitive descriptor"), so each is checked alone."""
    def check():
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((5, 32), (24, 32), (24,)))
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        tol = _PROBE_TOL[dtype]
        return torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol)

    return _probed(_STATE, dtype, "oneDNN linear (using F.linear)", check)


def use_onednn(enabled: bool | None) -> None:
    """Force the oneDNN path on (for the dtypes where it works) or off; None re-probes."""
    _force(_STATE, enabled)


# ---- packed weights ---------------------------------------------------------------------------
# oneDNN's linear reads a weight reordered once into its own blocked layout
# (``mkldnn._reorder_linear_weight``) 1.2-2.8x faster than the plain one, which it reorders on
# every call (measured, bf16 on the project's AMD EPYC: 3072x576 at 1 row 142 -> 51 us, 16 rows
# 293 -> 158 us; the 49152x576 lm_head at 1 row 3296 -> 1737 us), with bit-identical results
# in bf16 (fp32's differ at one row, so fp32 stays plain). A packed weight is a copy
# (``LlamaModel.pack_weights`` makes them once a CPU model has stayed resident
# PACK_AFTER_STEPS steps: the reorder costs about a copy of the bytes, 0.33 ms for 3.5 MB);
# probed once: bit-identical results or no packing.
_PACK: dict[torch.dtype, bool] = {}


def _pack_ok(dtype: torch.dtype) -> bool:
    def check():
        if dtype != torch.bfloat16 or not _onednn_ok(dtype):
            return False
        g = torch.Generator().manual_seed(1)
        w = torch.randn(96, 64, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        return all(torch.equal(
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
            for x in (torch.randn(m, 64, generator=g).to(dtype) for m in (1, 7, 40)))

    return _probed(_PACK, dtype, "packed oneDNN weights", check)


def use_packing(enabled: bool | None) -> None:
    """Force weight packing off (False) or re-probe it (None / True)."""
    _force(_PACK, enabled)


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [N, K] reordered for oneDNN's linear (a copy), or None where packing is not
    used (not CPU, not bf16, or the probe failed)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not _pack_ok(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if weight.is_mkldnn:  # packed (``pack``): only oneDNN reads it
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    big = x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
    if (x.device.type == "cpu" and x.dtype in _DTYPES
            and weight.dtype == x.dtype and big and _onednn_ok(x.dtype)):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError as e:  # a shape the probe did not cover: never again this dtype
            logger.warning("oneDNN linear failed for %s (%s); using F.linear", x.dtype, e)
            _STATE[x.dtype] = False
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and big
            and _onednn_ok(torch.float32)):
        # no oneDNN bf16 kernel on this CPU (AVX2 machines): torch's own bf16 product is ~2x
        # slower than widening the weights to fp32 for oneDNN's fp32 one from ~8 rows (the
        # native GEMV serves fewer), rounded to bf16 once as F.linear's is
        w32 = weight.float()
        return linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# ---- int8 weight-only ------------------------------------------------------------------------
# torch's CPU kernel for weight-only int8 (``aten._weight_int8pack_mm``: bf16 activations,
# int8 weights [N, K], bf16 scales [N]) reads the int8 weights once per activation row at about
# the bandwidth of oneDNN's bf16 GEMV, so at one row it is ~2x faster than bf16 (measured on
# SmolLM2's layers: 10.5 ms vs 20.4 ms a step) and it loses from ~28 rows on (the cost grows
# with the rows). It returns garbage for K not a multiple of 16 and crashed for K=100, so it
# is used only for K % 32 == 0, contiguous operands, at most INT8_PACK_MAX_ROWS rows, after a
# probe at first use. On CUDA (or with the kernel mode ``triton``) a Triton kernel
# (:mod:`gpupool.kernels.int8`) reads the int8 weights and scales the fp32 accumulator.
# Everything else (fp32 and fp16 activations on CPU, more rows) takes the reference: dequantize
# the weight to x's dtype and scale the output rows, ``y = (x @ q.T) * scale`` (exact int8 ->
# 16/32-bit conversion).
INT8_PACK_MAX_ROWS = 24
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT8_PACK: dict[torch.dtype, bool] = {}  # bf16 activations: the kernel works


def _int8_pack_ok() -> bool:
    def check():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
        q = torch.randint(-127, 128, (40, 64), generator=g, dtype=torch.int8)
        s = (torch.rand(40, generator=g) + 0.5).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, q, s)
        ref = (x.float() @ q.float().T) * s.float()
        return bool(((y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()).item())

    return _probed(_INT8_PACK, torch.bfloat16, "int8 weight-only kernel (dequantizing)", check)


def use_int8_kernel(enabled: bool | None) -> None:
    """Force the int8 kernel off (False) or re-probe it (None / True)."""
    _force(_INT8_PACK, enabled)


def linear_int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None, product=None) -> torch.Tensor:
    """``product`` (default :func:`linear`): the product of x and the widened weight."""
    y = (product or linear)(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, triton: bool = False) -> torch.Tensor:
    """``F.linear(x, q * scale[:, None], bias)`` for int8 ``q`` [N, K] and per-row ``scale``
    [N] (in x's dtype), without materialising the float weight where the kernel allows;
    ``triton``: Triton's kernel (the backend's choice, kernels.backend)."""
    if triton and x.dtype in _TRITON_DTYPES:
        from gpupool.kernels.int8 import linear_int8 as triton_int8

        return triton_int8(x, q, scale, bias)
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and 0 < rows <= INT8_PACK_MAX_ROWS
            and x.shape[-1] % 32 == 0 and q.is_contiguous() and scale.dtype == torch.bfloat16
            and _int8_pack_ok()):
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, q, scale).view(*x.shape[:-1], q.shape[0])
        return y if bias is None else y + bias
    return linear_int8_reference(x, q, scale, bias)
