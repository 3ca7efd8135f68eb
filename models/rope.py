"""Rotary position embeddings: default, linear, Llama-3, YaRN and LongRoPE frequency scaling,
and partial rotary dimensions.

LongRoPE (Phi-3): a sequence of at most ``original_max_position_embeddings`` tokens uses the
short factors, a longer one the long factors at every position, each row scaled by the
attention factor: transformers' rule (it recomputes a sequence's cache when its length
crosses the threshold; the scheduler does the same, ``Scheduler.rope_switch``). The table
holds both: the short rows, then the long rows from ``rope_long_offset``.

Partial rotary (Phi-4-mini): transformers rotates the first ``rotary_dim`` dimensions of
each head in pairs (i, i + rotary_dim / 2). The kernels rotate whole heads in pairs
(i, i + head_dim / 2), so q's and k's head dimensions are stored in the order
``rotary_order`` gives (``kernels.reference.rotary_order``; the loader permutes the rows of
q and k, and of LoRA B for them; a dot product of q and k is the same sum in another order)
and the table's rows are cos 1, sin 0 on the dimensions that do not rotate.
"""

from __future__ import annotations

import math

import torch

from gpupool.kernels import reference
from gpupool.models.config import ModelConfig
from gpupool.models.errors import ModelLoadError

SUPPORTED_ROPE = ("default", "linear", "llama3", "longrope", "yarn")


def inv_frequencies(cfg: ModelConfig, long: bool = False) -> torch.Tensor:
    """[rotary_dim // 2] float32, computed exactly as transformers does (``long``: LongRoPE's
    long factors)."""
    dim = cfg.rotary_dim
    shape = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE:
        supported = ", ".join(SUPPORTED_ROPE)
        raise ModelLoadError(f"rope scaling {kind!r} is not supported ({supported})")
    if kind == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        if len(factors) != dim // 2:
            raise ModelLoadError(f"longrope factors: {len(factors)}, the rotary dimensions "
                                 f"need {dim // 2}")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * cfg.rope_theta**shape)
    inv = 1.0 / (cfg.rope_theta ** shape)
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "yarn":
        return _yarn_frequencies(cfg, cfg.rope_theta ** shape)
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def _yarn_factor(cfg: ModelConfig) -> float:
    scaling = cfg.rope_scaling
    return float(scaling.get("factor") or cfg.max_position_embeddings
                 / scaling["original_max_position_embeddings"])


def _yarn_frequencies(cfg: ModelConfig, pos_freqs: torch.Tensor) -> torch.Tensor:
    """YaRN (Peng et al. 2023; Qwen2.5/Qwen3's long context, gpt-oss): each frequency
    between its own and its interpolated one (/ factor) by a ramp over the dimensions whose
    number of rotations in the original context lies between beta_slow and beta_fast;
    transformers' arithmetic, its ``truncate`` included."""
    scaling, dim, base = cfg.rope_scaling, cfg.rotary_dim, cfg.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = _yarn_factor(cfg)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers': no division by zero)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the share of the frequency's own value
    return 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def _yarn_attention_factor(cfg: ModelConfig) -> float:
    """The scale of YaRN's cos and sin rows: ``attention_factor``, else 0.1 ln(factor) + 1
    (with DeepSeek's ``mscale`` / ``mscale_all_dim`` where both are given)."""
    scaling = cfg.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = _yarn_factor(cfg)
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
    return mscale(factor)


def _longrope_attention_factor(cfg: ModelConfig) -> float:
    scaling = cfg.rope_scaling
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rotary_order(cfg: ModelConfig) -> torch.Tensor | None:
    """The order q's and k's head dimensions are stored in (None: as they come)."""
    return reference.rotary_order(cfg.head_dim, cfg.rotary_dim)


def rope_switch(cfg: ModelConfig) -> int | None:
    """LongRoPE's threshold: a sequence longer than this many tokens uses the long factors."""
    if cfg.rope_scaling.get("rope_type") == "longrope":
        return int(cfg.rope_scaling["original_max_position_embeddings"])
    return None


def rope_table(cfg: ModelConfig, max_positions: int, dtype, device) -> torch.Tensor:
    """The model's table: ``cos_sin_table``, and for LongRoPE the long factors' rows after
    the short ones (a long sequence's rows start at ``max_positions``)."""
    table = cos_sin_table(cfg, max_positions, dtype, device)
    if rope_switch(cfg) is None:
        return table
    return torch.cat((table, cos_sin_table(cfg, max_positions, dtype, device, long=True)))


def cos_sin_table(cfg: ModelConfig, max_positions: int, dtype, device,
                  long: bool = False) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin per position (rows of ``cat(f, f)`` in the
    stored dimension order; ``long``: LongRoPE's long factors)."""
    positions = torch.arange(max_positions, device=device).float()[:, None]
    freqs = positions * inv_frequencies(cfg, long).to(device)[None, :]
    scale = 1.0
    if rope_switch(cfg) is not None:
        scale = _longrope_attention_factor(cfg)
    elif cfg.rope_scaling.get("rope_type") == "yarn":
        scale = _yarn_attention_factor(cfg)
    pad = (cfg.head_dim - cfg.rotary_dim) // 2  # dimensions that do not rotate: angle 0
    freqs = torch.cat((freqs, freqs.new_zeros(max_positions, pad)), dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:  # on the rotary dimensions only (as transformers scales its cos/sin)
        rot = torch.cat((freqs.new_ones(freqs.shape[-1] - pad), freqs.new_zeros(pad)))
        rot = torch.cat((rot, rot)).bool()
        cos[:, rot] *= scale
        sin[:, rot] *= scale
    return torch.stack((cos, sin), dim=1).to(dtype)
