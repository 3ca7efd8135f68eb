"""What this CPU computes natively, read at run time (machines differ from session to
session: never assume). No torch here."""

from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products (AVX-512 BF16, AMX)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (``flags``: injected in tests)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def avx2_fma(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether the CPU has AVX2 and FMA (x86-64-v3: the native kernels' AVX2 build)."""
    flags = cpu_flags() if flags is None else flags
    return {"avx2", "fma"} <= set(flags)


def auto_cpu_dtype(flags=None, bf16_gemv: bool = True) -> str:
    """``dtype="auto"`` on CPU: bf16 where the CPU computes it natively; also on AVX2 + FMA
    where the native bf16 GEMV was built (``bf16_gemv``: half the bytes a decode step reads,
    bf16 x bf16 products summed in fp32, bit-identical to the AVX-512 BF16 build; so no
    longer the token-exact fp32, which ``--dtype float32`` keeps); else float32."""
    if native_bf16(flags) or (avx2_fma(flags) and bf16_gemv):
        return "bfloat16"
    return "float32"
