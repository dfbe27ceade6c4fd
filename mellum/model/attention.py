"""Causal self-attention with grouped-query heads, optional QK-norm and sliding windows, over a pluggable KV cache.

Shapes: B batch, T query tokens, S key slots, H query heads, Hkv key/value heads, D head dim, C model width.
Masks are computed from positions (never from slot order), so a position-addressed cache and a sliding-window
ring buffer (mellum.engine) plug in through one protocol: `k, v, mask = cache.update(layer_idx, k, v, positions)`.
"""

from __future__ import annotations

from typing import NamedTuple

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


class CachedPrefix(NamedTuple):
    """Keys/values [B, Hkv, P, D] of the positions before a chunk of new tokens, every one of them visible to every
    new token (a cache's alternative to a mask: the new tokens then attend causally among themselves)."""

    k: torch.Tensor
    v: torch.Tensor


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: CachedPrefix) -> torch.Tensor:
    """softmax attention of q [B, H, T, D] over prefix keys (all visible) plus the T new keys k, v [B, Hkv, T, D]
    (causal), without a [T, P + T] mask: two CPU flash-attention passes merged by their log-sum-exp (the
    split-softmax identity of FlashAttention / FlashDecoding). The prefix pass folds each key head's query group
    into its query length, so grouped-query prefixes are read once, not repeated per query head."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # assumes unit stride in the last dim
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if prefix.k.stride(-1) != 1 or prefix.v.stride(-1) != 1:
        prefix = CachedPrefix(prefix.k.contiguous(), prefix.v.contiguous())
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    out_p, lse_p = flash(q.reshape(b, h // groups, groups * t, d), prefix.k, prefix.v)
    out_p, lse_p = out_p.reshape(b, h, t, d), lse_p.reshape(b, h, t)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out_n, lse_n = flash(q, k, v, is_causal=True)
    lse = torch.logaddexp(lse_p, lse_n)  # [B, H, T]
    return out_p * torch.exp(lse_p - lse)[..., None].to(q.dtype) + out_n * torch.exp(lse_n - lse)[..., None].to(q.dtype)


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
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections (inference)
        # Inference engines may install a faster attention for one query token over all cached keys:
        # f(q [B, H, 1, D], k, v [B, Hkv, S, D]) -> [B, H, 1, D], equal to unmasked SDPA (the CPU engine does).
        self.decode_attention = None
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
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), *rope)  # [B, H, T, D]
        k = apply_rotary(k.transpose(1, 2), *rope)  # [B, Hkv, T, D]
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v, positions)  # [B, Hkv, S, D], mask [B, 1, T, S]
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, CachedPrefix):
            y = prefix_causal_attention(q, k, v, mask)
        elif mask is None:
            # No mask: causal over the keys of these tokens alone, or for one query token (a decode step) every
            # key the cache returned (the cache returns no mask only when all of them are visible).
            if t == 1 and self.decode_attention is not None:
                y = self.decode_attention(q, k, v)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y)

    @property
    def _qkv_sizes(self) -> tuple[int, int, int]:
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)

    def fuse_projections(self) -> None:
        """Replace q/k/v by one linear layer: one matrix product per step instead of three (inference only; the
        fused module's state-dict keys no longer match checkpoints)."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj


def fused_linear(*layers: nn.Linear) -> nn.Linear:
    """One bias-free linear layer computing the concatenated outputs of `layers` (same input)."""
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])  # [sum(out), in]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused
