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


def auto_cpu_dtype(flags=None) -> str:
    """``dtype="auto"`` on CPU: bf16 where the CPU computes it natively, else float32."""
    return "bfloat16" if native_bf16(flags) else "float32"
