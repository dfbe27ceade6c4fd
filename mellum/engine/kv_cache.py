"""Key/value cache addressed by token position: full-length buffers for full-attention layers, rings of
`window + slack` entries for sliding-window layers, one row per concurrent sequence.

The model's attention calls `view.update(layer_idx, k, v, positions)` (docs/interfaces.md, "KV-cache protocol") and
gets back every stored key/value of its rows plus a boolean mask computed from the stored key positions, so the
cached and uncached paths share one masking rule. Each stored entry remembers its position (-1 = empty): rolling
back rejected speculative tokens needs no copy, because entries written after the accepted length are in the
future of every later query (masked as non-causal) and are overwritten in order.

Ring slack: a sliding layer keeps `window + slack` entries, so that (a) a speculative verify of up to `slack`
tokens never overwrites a key that a later query still needs after a rejection, and (b) the prefix cache can copy
the last `window` keys of a prompt's complete blocks out of the ring after prefill (REFERENCE.md §4: a ring of
exactly `window` entries cannot rewind).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mellum.model.attention import CachedPrefix, attention_mask


@dataclass
class LayerKV:
    """One layer's storage: k, v [R, Hkv, S, D]; positions [R, S] (-1 = empty). Ring when S < max_len."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    window: int | None
    ring: bool

    @property
    def size(self) -> int:
        return self.k.shape[2]


class KVCache:
    """Per-layer KV storage for `rows` sequences of up to `max_len` tokens. `windows[i]` is None for full attention."""

    def __init__(self, windows: list[int | None], rows: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", slack: int = 64,
                 separate_layers: tuple[int, ...] = ()):
        self.windows = list(windows)
        # Layers of one kind (same window and size) store the same positions, so a forward computes their mask
        # once. `separate_layers` (the MTP layer, written by its own forwards) always compute their own.
        self.separate_layers = frozenset(separate_layers)
        self.rows, self.max_len, self.slack = rows, max_len, slack
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, torch.device(device)
        self.layers: list[LayerKV] = []
        for window in self.windows:
            size = self.layer_size(window, max_len, slack)
            shape = (rows, num_kv_heads, size, head_dim)
            self.layers.append(LayerKV(
                k=torch.zeros(shape, dtype=dtype, device=self.device),
                v=torch.zeros(shape, dtype=dtype, device=self.device),
                pos=torch.full((rows, size), -1, dtype=torch.long, device=self.device),
                window=window, ring=size < max_len,
            ))

    @staticmethod
    def layer_size(window: int | None, max_len: int, slack: int) -> int:
        """Slots per row of one layer: every position for full attention, a ring of window + slack otherwise."""
        return max_len if window is None else min(max_len, window + slack)

    @classmethod
    def row_nbytes(cls, windows: list[int | None], max_len: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, slack: int) -> int:
        """Bytes one row takes over all layers: keys, values and stored positions."""
        per_slot = 2 * num_kv_heads * head_dim * dtype.itemsize + torch.empty((), dtype=torch.long).element_size()
        return sum(cls.layer_size(w, max_len, slack) for w in windows) * per_slot

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in (layer.k, layer.v, layer.pos))

    def reset(self, row: int) -> None:
        """Forget everything stored for one row (a new sequence takes the slot)."""
        self.forget(row, 0)

    def forget(self, row: int, start: int) -> None:
        """Forget one row's positions >= start (a new sequence keeps the shared prefix before them)."""
        for layer in self.layers:
            pos = layer.pos[row]
            pos.masked_fill_(pos >= start, -1)

    def view(self, rows: list[int], kv_len: int, fresh: bool = False, padded: bool = False) -> "CacheView":
        """The cache seen by one forward over `rows`; `kv_len` = 1 + the largest position written in it.
        `fresh`: the forward holds positions 0..T-1 of every row (the first prefill chunk), so nothing cached
        before it is visible and attention can run causally over the chunk alone. `padded`: `kv_len` is rounded
        up past the largest position (CUDA-graph buckets), so slots below it may be stale and always need the mask."""
        if kv_len > self.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache length {self.max_len}")
        return CacheView(self, rows, kv_len, fresh, padded)

    def held_from(self, layer_idx: int, row: int, end: int) -> int:
        """The lowest position s such that one row of a layer holds every position in [s, end) (end when it lacks
        end - 1). A sliding layer holds less than its size after a reset or a prefix-cache load (only the blocks
        before the reuse point), and a ring slot keeps only the last position written to it."""
        layer = self.layers[layer_idx]
        pos = layer.pos[row]
        back = end - 1 - pos  # [S] how far each stored position lies before end - 1
        back = back[(pos >= 0) & (back >= 0) & (back < layer.size)]
        have = torch.zeros(layer.size + 1, dtype=torch.bool, device=self.device)
        have[back] = True
        return end - int(torch.argmin(have.to(torch.uint8)))  # the first offset missing (have[size] always is)

    # ---- copying spans in and out (prefix cache) -------------------------------------------------------
    def read(self, layer_idx: int, row: int, start: int, end: int) -> torch.Tensor:
        """KV of positions [start, end) of one row and layer as one tensor [2, Hkv, end-start, D] (a copy)."""
        layer = self.layers[layer_idx]
        if not layer.ring:
            return torch.stack([layer.k[row, :, start:end], layer.v[row, :, start:end]])
        if end - start > layer.size:
            raise ValueError(f"positions [{start}, {end}) do not fit layer {layer_idx}'s ring of {layer.size}")
        slots = torch.arange(start, end, device=self.device) % layer.size
        return torch.stack([layer.k[row, :, slots], layer.v[row, :, slots]])

    def write(self, layer_idx: int, row: int, start: int, kv: torch.Tensor) -> None:
        """Store kv [2, Hkv, n, D] at positions [start, start + n) of one row and layer."""
        layer = self.layers[layer_idx]
        n = kv.shape[2]
        if not layer.ring:
            layer.k[row, :, start:start + n] = kv[0]
            layer.v[row, :, start:start + n] = kv[1]
            layer.pos[row, start:start + n] = torch.arange(start, start + n, device=self.device)
            return
        self.write_at(layer_idx, row, torch.arange(start, start + n, device=self.device), kv)

    def read_at(self, layer_idx: int, row: int, positions: torch.Tensor) -> torch.Tensor:
        """KV of the given positions [n] (each held by the row) of one row and layer: [2, Hkv, n, D] (a copy)."""
        layer = self.layers[layer_idx]
        slots = positions.to(self.device) % layer.size  # a full layer's slot is its position
        return torch.stack([layer.k[row, :, slots], layer.v[row, :, slots]])

    def write_at(self, layer_idx: int, row: int, positions: torch.Tensor, kv: torch.Tensor) -> None:
        """Store kv [2, Hkv, n, D] at the given positions [n] of one row and layer."""
        layer = self.layers[layer_idx]
        positions = positions.to(self.device)
        slots = positions % layer.size
        layer.k[row, :, slots] = kv[0].to(layer.k.dtype)
        layer.v[row, :, slots] = kv[1].to(layer.v.dtype)
        layer.pos[row, slots] = positions


class CacheView:
    """The slice of a `KVCache` used by one forward pass: a set of rows and the current key length."""

    def __init__(self, cache: KVCache, rows: list[int], kv_len: int, fresh: bool = False, padded: bool = False):
        self.cache, self.kv_len, self.rows, self.fresh, self.padded = cache, kv_len, list(rows), fresh, padded
        self._masks: dict[tuple, torch.Tensor] = {}  # per layer kind: the mask of this forward
        lo = rows[0]
        # Contiguous rows are a basic slice (a view, no copy); others gather (a copy per layer).
        self._slice = slice(lo, lo + len(rows)) if rows == list(range(lo, lo + len(rows))) else None
        self._rows = torch.tensor(rows, dtype=torch.long, device=cache.device)

    def _take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self._slice] if self._slice is not None else t[self._rows]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v [B, Hkv, T, D] at `positions` [B, T]; return (k_all, v_all [B, Hkv, S, D], mask [B, 1, T, S]).
        A cache of another dtype than k (fp16 beside fp32 activations) stores rounded values and returns them in k's
        dtype, so attention sees exactly what later steps (and the fused decoder) read back."""
        k_all, v_all, mask = self._update(layer_idx, k, v, positions)
        if k_all.dtype == k.dtype:
            return k_all, v_all, mask
        if isinstance(mask, CachedPrefix):
            mask = CachedPrefix(mask.k.to(k.dtype), mask.v.to(k.dtype))
        return k_all.to(k.dtype), v_all.to(k.dtype), mask

    def _update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        layer = self.cache.layers[layer_idx]
        B, _, T, _ = k.shape
        slots = positions % layer.size  # [B, T]
        rows = self._rows[:, None].expand(B, T)  # [B, T]
        k_new = k.transpose(1, 2).to(layer.k.dtype)  # [B, T, Hkv, D]
        v_new = v.transpose(1, 2).to(layer.v.dtype)
        if layer.ring and T > self.cache.slack + 1:
            # A chunk longer than the slack would overwrite keys its own earlier queries need: attend over the old
            # ring plus the new chunk, then keep the chunk's last entries in the ring.
            k_all = torch.cat([self._take(layer.k), k.to(layer.k.dtype)], dim=2)
            v_all = torch.cat([self._take(layer.v), v.to(layer.v.dtype)], dim=2)
            k_pos = torch.cat([self._take(layer.pos), positions], dim=1)
            keep = slice(T - min(T, layer.size), T)
            layer.k[rows[:, keep], :, slots[:, keep]] = k_new[:, keep]
            layer.v[rows[:, keep], :, slots[:, keep]] = v_new[:, keep]
            layer.pos[rows[:, keep], slots[:, keep]] = positions[:, keep]
        else:
            layer.k[rows, :, slots] = k_new
            layer.v[rows, :, slots] = v_new
            layer.pos[rows, slots] = positions
            size = layer.size if layer.ring else self.kv_len
            k_all = self._take(layer.k)[:, :, :size]
            v_all = self._take(layer.v)[:, :, :size]
            k_pos = self._take(layer.pos)[:, :size]
        if self.fresh and (layer.window is None or T <= layer.window):
            # Positions 0..T-1 with nothing before them: plain causal attention over the chunk's own keys equals the
            # masked attention over the cache, and is_causal SDPA skips the upper triangle (about 2x faster on CPU
            # at 4k tokens than an explicit boolean mask).
            return k.to(layer.k.dtype), v.to(layer.v.dtype), None
        if (B == 1 and layer.window is None and not self.padded
                and layer_idx not in self.cache.separate_layers):
            # One row on a full-attention layer (a sliding layer keeps every position when max_len <= window + slack,
            # but its window still masks them): slots 0..kv_len-1 hold exactly positions 0..kv_len-1 of this
            # sequence (prefix-cache copy, kept row prefix, prefill and decode fill them in order; entries of
            # rejected drafts lie at or beyond kv_len), and the new tokens are the last T of them. So no mask:
            if T == 1:  # every key is visible (2-3x faster at 4k keys on CPU than the boolean mask)
                return k_all, v_all, None
            start = self.kv_len - T
            if start > 0 and k.device.type == "cpu":  # the cached prefix in full, the new tokens causally
                prefix = CachedPrefix(k_all[:, :, :start], v_all[:, :, :start])
                return k.to(layer.k.dtype), v.to(layer.v.dtype), prefix
        kind = ("own", layer_idx) if layer_idx in self.cache.separate_layers else (layer.window, layer.size)
        mask = self._masks.get(kind)
        if mask is None:
            mask = self._masks[kind] = attention_mask(positions, k_pos, layer.window)
        return k_all, v_all, mask
