"""Rotary position embeddings: default, linear and Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from gpupool.models.config import ModelConfig
from gpupool.models.errors import ModelLoadError

SUPPORTED_ROPE = ("default", "linear", "llama3")


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32, computed exactly as transformers does."""
    dim = cfg.head_dim
    inv = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
    )
    scaling = cfg.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE:
        supported = ", ".join(SUPPORTED_ROPE)
        raise ModelLoadError(f"rope scaling {kind!r} is not supported ({supported})")
    if kind == "linear":
        return inv / scaling["factor"]
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


def cos_sin_table(cfg: ModelConfig, max_positions: int, dtype, device) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin per position (rows of ``cat(f, f)``)."""
    inv = inv_frequencies(cfg).to(device)
    freqs = torch.arange(max_positions, device=device).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype)
