"""Types shared by the adapter package: errors, what an adapter is, and its config."""

from __future__ import annotations

from dataclasses import dataclass

from gpupool.messages.errors import AdapterError

# LoRA-targetable projections, grouped by the fused matmul they add to:
#   group -> (input width key, [(projection, output width key), ...])
GROUPS = {
    "qkv": ("hidden", [("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")]),
    "o": ("q", [("o_proj", "hidden")]),
    "gate_up": ("hidden", [("gate_proj", "inter"), ("up_proj", "inter")]),
    "down": ("inter", [("down_proj", "hidden")]),
}
PROJECTIONS = tuple(p for _, projs in GROUPS.values() for p, _ in projs)


__all__ = ["GROUPS", "PROJECTIONS", "AdapterConfig", "AdapterError", "AdapterRef"]


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter memory per base model."""

    # device copies: None (default) follows demand, in pages of the KV pool as many as
    # requests need (adapters/paged.py); a number caps them (and a step's distinct adapters)
    max_loras_on_device: int | None = None
    max_lora_rank: int = 16  # largest rank accepted
    # device copies the adapters of one tenant may hold at once (None: no cap), so one
    # tenant's many adapters cannot push other tenants' hot ones out; a step also holds at
    # most this many distinct adapters of one tenant
    max_loras_per_tenant: int | None = None
    # host copies of adapters read from disk, per base model (LRU; its own budget, apart
    # from the KV host swap's): registering costs none, a first use reads the file
    host_adapter_bytes: int = 1 << 30

    def __post_init__(self):
        if any(v is not None and v < 1 for v in (self.max_loras_on_device, self.max_lora_rank,
                                                  self.max_loras_per_tenant)):
            raise ValueError("max_loras_on_device, max_lora_rank and max_loras_per_tenant "
                             "must be >= 1")
        if self.host_adapter_bytes < 0:
            raise ValueError("host_adapter_bytes must be >= 0")


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter. ``scaling`` is already folded into its B weights."""

    name: str
    base: str
    path: str
    rank: int
    scaling: float
    targets: tuple[str, ...]
