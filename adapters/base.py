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
# a mixture of experts' expert projections (peft's ``target_parameters`` on
# ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``): each expert has its own A and B,
# projection ``experts.{e}.gate_up_proj`` / ``experts.{e}.down_proj``, one group a part (P =
# the number of experts), added after GROUPS' in a piece; only the torch path applies them
EXPERT_GROUPS = {"experts_gate_up": ("gate_up", "hidden", "moe_gate_up"),
                 "experts_down": ("down", "moe_inter", "hidden")}


def expert_projection(e: int, part: str) -> str:
    """The name of expert ``e``'s ``part`` (gate_up or down) as a LoRA target."""
    return f"experts.{e}.{part}_proj"


def groups_for(cfg) -> dict:
    """GROUPS, and for a mixture of experts (``cfg.num_experts``) its expert groups."""
    experts = getattr(cfg, "num_experts", 0) or 0
    if not experts:
        return GROUPS
    out = dict(GROUPS)
    for g, (part, k_in, width) in EXPERT_GROUPS.items():
        out[g] = (k_in, [(expert_projection(e, part), width) for e in range(experts)])
    return out


def expert_group(projection: str) -> str | None:
    """The expert group ``projection`` belongs to (None: not an expert projection)."""
    if not projection.startswith("experts."):
        return None
    return "experts_gate_up" if projection.endswith(".gate_up_proj") else "experts_down"


__all__ = ["EXPERT_GROUPS", "GROUPS", "PROJECTIONS", "AdapterConfig", "AdapterError",
           "AdapterRef", "expert_group", "expert_projection", "groups_for"]


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
