"""A simple position-addressed KV cache: the reference implementation of the cache protocol.

Slot s of every layer holds the key/value of position s (full length, no eviction). The engine's optimised
caches (ring buffers for sliding layers, prefix blocks) implement the same `update` and are tested against it.
"""

from __future__ import annotations

import torch

from mellum.model.attention import attention_mask


class DenseKVCache:
    """Keys/values [B, Hkv, max_len, D] per layer (MTP layer included); k_pos [B, max_len], -1 = empty."""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.config = config
        self.max_len = max_len
        n = config.num_layers + config.num_mtp_layers
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.k_pos = [torch.full((batch_size, max_len), -1, device=device, dtype=torch.long) for _ in range(n)]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v [B, Hkv, T, D] at positions [B, T] -> (k_all, v_all [B, Hkv, S, D], mask [B, 1, T, S])."""
        b, h, t, d = k.shape
        index = positions[:, None, :, None].expand(b, h, t, d)  # [B, Hkv, T, D]
        self.k[layer_idx].scatter_(2, index, k.to(self.k[layer_idx].dtype))
        self.v[layer_idx].scatter_(2, index, v.to(self.v[layer_idx].dtype))
        self.k_pos[layer_idx].scatter_(1, positions, positions)
        mask = attention_mask(positions, self.k_pos[layer_idx], self.config.window(layer_idx))
        return self.k[layer_idx], self.v[layer_idx], mask

    def truncate(self, length: int) -> None:
        """Forget every position >= length (rewind after rejected speculative tokens)."""
        for pos in self.k_pos:
            pos.masked_fill_(pos >= length, -1)
