"""Configuration: one frozen dataclass per part, composed into :class:`Config`.

Environment variables are read here and nowhere else (prefix ``GPUPOOL_``):
``GPUPOOL_HOME`` (data dir, default ``~/.cache/gpupool``), ``GPUPOOL_DEVICE``,
``GPUPOOL_KERNELS`` (auto | reference | triton).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpupool.adapters.base import AdapterConfig
from gpupool.scheduler.scheduler import SchedulerConfig

__all__ = ["AdapterConfig", "Config", "PoolConfig", "SchedulerConfig", "default_home"]


def default_home() -> Path:
    return Path(os.environ.get("GPUPOOL_HOME", "~/.cache/gpupool")).expanduser()


@dataclass(frozen=True)
class PoolConfig:
    """Device memory the engine reserves once (the arena) and the host model cache."""

    kv_cache_bytes: int | None = None  # KV region; None: a share of free memory
    kv_page_bytes: int = 1 << 20  # bytes per KV page (every model's view of a page)
    weight_bytes: int | None = None  # weight region (model slabs); None: a share of free
    adapter_bytes: int = 1 << 30  # adapter region (LoRA slots of every base model)
    host_cache_bytes: int | None = None  # host model cache bound; None: 50% of available
    host_kv_bytes: int = 512 << 20  # host pages for preempted requests' KV (0: recompute)

    def __post_init__(self):
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < self.kv_page_bytes:
            raise ValueError("kv_cache_bytes must hold at least one page")
        if self.kv_page_bytes < 16 or self.kv_page_bytes % 16:
            raise ValueError("kv_page_bytes must be a positive multiple of 16")


@dataclass(frozen=True)
class Config:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, the model's dtype on GPU) | float32 | ...
    kernels: str = "auto"  # auto | reference | triton
    home: Path = field(default_factory=default_home)
    pool: PoolConfig = field(default_factory=PoolConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self):
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"kernels must be auto, reference or triton, not {self.kernels!r}")

    @classmethod
    def from_env(cls, **overrides) -> Config:
        """Defaults, then ``GPUPOOL_*`` variables, then keyword overrides.

        An override may name a field of Config, PoolConfig, SchedulerConfig or
        AdapterConfig.
        """
        top = {"home": default_home()}
        for key in ("device", "kernels"):
            if f"GPUPOOL_{key.upper()}" in os.environ:
                top[key] = os.environ[f"GPUPOOL_{key.upper()}"]
        parts = {"pool": {}, "scheduler": {}, "adapters": {}}
        sub = {"pool": PoolConfig, "scheduler": SchedulerConfig, "adapters": AdapterConfig}
        for key, value in overrides.items():
            if value is None:
                continue
            owner = next((p for p, c in sub.items()
                          if key in {f.name for f in dataclasses.fields(c)}), None)
            if owner:
                parts[owner][key] = value
            elif key in {f.name for f in dataclasses.fields(cls)}:
                top[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return cls(pool=PoolConfig(**parts["pool"]),
                   scheduler=SchedulerConfig(**parts["scheduler"]),
                   adapters=AdapterConfig(**parts["adapters"]), **top)
