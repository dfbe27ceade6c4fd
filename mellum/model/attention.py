"""Causal self-attention with grouped-query heads, optional QK-norm and sliding windows, over a pluggable KV cache.

Shapes: B batch, T query tokens, S key slots, H query heads, Hkv key/value heads, D head dim, C model width.
Masks are computed from positions (never from slot order), so a position-addressed cache and a sliding-window
ring buffer (mellum.engine) plug in through one protocol: `k, v, mask = cache.update(layer_idx, k, v, positions)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellum.model.norm import RMSNorm
from mellum.model.rotary import apply_rotary


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] (True = attend) from query positions [B, T] and key positions [B, S].

    A key is visible when its slot is filled (k_pos >= 0), it is not in the future, it lies within the window
    (q_pos - k_pos < window, as in transformers' sliding-window mask) and, for packed sequences, it belongs to
    the same document.
    """
    q = q_pos[:, :, None]  # [B, T, 1]
    k = k_pos[:, None, :]  # [B, 1, S]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & (q - k < window)
    if q_doc is not None:
        if k_doc is None:
            raise ValueError("attention_mask: q_doc given without k_doc")
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask[:, None]  # [B, 1, T, S]


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = config.window(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        c, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(c, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(c, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias=False)
        # Qwen3-style QK-norm: one RMSNorm over each head's D features, shared by all heads.
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache=None,
    ) -> torch.Tensor:
        """x [B, T, C]; rope cos/sin [B, T, D]; positions [B, T]; mask [B, 1, T, T] or None for plain causal."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), *rope)  # [B, H, T, D]
        k = apply_rotary(k.transpose(1, 2), *rope)  # [B, Hkv, T, D]
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v, positions)  # [B, Hkv, S, D], mask [B, 1, T, S]
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y)
