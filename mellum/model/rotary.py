"""Rotary position embeddings (RoFormer, arXiv:2104.09864) with optional YaRN scaling (arXiv:2309.00071).

One `RotaryEmbedding` per attention type: Mellum 2 uses base 500000 on full-attention layers and 10000 on
sliding-window layers, and applies YaRN only to the full-attention layers (layer-selective YaRN, 8K → 128K):
sliding layers never see distances beyond their window, so they need no extrapolation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts" frequencies and the attention temperature factor (paper §3.2–3.4).

    Dimensions that rotate fewer than `beta_slow` times over the original context are interpolated (divided by
    `factor`), those rotating more than `beta_fast` times are kept, with a linear ramp in between.
    """
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    extrapolate, interpolate = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:  # the dimension that rotates `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high-frequency dims), 0: interpolate
    inv_freq = interpolate * (1 - keep) + extrapolate * keep
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0  # sqrt(1/t) = 0.1 ln(s) + 1
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; `scaling` (YaRN dict) or None for plain RoPE."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
            self.attention_factor = 1.0
        else:
            inv_freq, self.attention_factor = yarn_inv_freq(head_dim, theta, scaling)
        # Derived from the config, never stored in checkpoints; built on CPU even under a meta-device context.
        self.register_buffer("inv_freq", inv_freq.to("cpu"), persistent=False)

    def _apply(self, fn, recurse=True):
        # A module-wide cast (model.to(torch.bfloat16), .half()) moves the table but keeps it fp32: bf16 frequencies
        # are off by up to 2^-9, a rotation error of several radians at position 8K, and a model loaded from the
        # same weights (tables built fresh) would compute other logits.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, T, D] (the D/2 frequencies repeated twice, rotate-half layout)
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, sin [B, T, D]. Rotate-half pairing (dims i and i + D/2), as in HF Llama checkpoints."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
