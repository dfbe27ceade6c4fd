"""Prefix cache across requests: a tree of fixed-size token blocks holding their KV, evicted LRU under a byte budget.

Consecutive completion requests from one editor share most of their prompt (same context files, a prefix grown by
a few characters), so a new request copies the KV of its longest cached block prefix into its cache row and
prefills only the rest (the idea of vLLM's automatic prefix caching and SGLang's RadixAttention; llama.cpp's
`cache_prompt` keeps only the last prompt). Blocks are nodes of a tree keyed by their tokens under their parent,
so two prompts that differ in one early token share nothing after it, as attention requires.

Full-attention layers store KV for every block. Sliding-window layers need only the `window` keys before the
reuse point, so a block keeps sliding-layer KV only when it lay in the ring of its prompt's last `window + slack`
tokens (REFERENCE.md §4); a match is usable up to the deepest block whose preceding `window` tokens all kept it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import torch

from mellum.engine.kv_cache import KVCache


@dataclass(eq=False)
class Block:
    """A node: `block_tokens` tokens after its parent's, with their KV [layers, 2, Hkv, n, D] per layer kind."""

    tokens: tuple[int, ...]
    parent: "Block | None"
    depth: int  # number of blocks from the root to this one, inclusive
    full_kv: torch.Tensor | None = None
    sliding_kv: torch.Tensor | None = None
    last_used: int = 0
    children: dict[tuple[int, ...], "Block"] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.full_kv, self.sliding_kv) if t is not None)


@dataclass
class PrefixMatch:
    """The reusable prefix of a prompt: `tokens` positions covered by `blocks`."""

    tokens: int
    blocks: list[Block]


class PrefixCache:
    """Token-block tree with KV per block; `match` → `load` before prefill, `insert` after it."""

    def __init__(self, budget_bytes: int, block_tokens: int, windows: list[int | None]):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.budget_bytes, self.block_tokens = int(budget_bytes), block_tokens
        self.full_layers = [i for i, w in enumerate(windows) if w is None]
        self.sliding_layers = [i for i, w in enumerate(windows) if w is not None]
        window = max((w for w in windows if w is not None), default=0)
        self.blocks_needed = math.ceil(window / block_tokens)  # blocks of sliding KV before a reuse point
        self.root = Block(tokens=(), parent=None, depth=0)
        self.nbytes = 0
        self._clock = itertools.count(1)
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return sum(1 for _ in self._walk())

    def _walk(self):
        stack = list(self.root.children.values())
        while stack:
            block = stack.pop()
            yield block
            stack.extend(block.children.values())

    def _chunks(self, tokens: list[int], limit: int):
        bt = self.block_tokens
        for j in range(limit // bt):
            yield tuple(tokens[j * bt:(j + 1) * bt])

    # ---- lookup ---------------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int) -> PrefixMatch:
        """The longest reusable block prefix of `tokens[:limit]` (marked as recently used)."""
        self.lookups += 1
        chain: list[Block] = []
        node = self.root
        for key in self._chunks(tokens, limit):
            node = node.children.get(key)
            if node is None:
                break
            chain.append(node)
        # Deepest depth d whose previous `blocks_needed` blocks all kept sliding-layer KV.
        usable = len(chain)
        if self.sliding_layers:
            usable = 0
            for d in range(len(chain), 0, -1):
                span = chain[max(0, d - self.blocks_needed):d]
                if all(b.sliding_kv is not None for b in span):
                    usable = d
                    break
        chain = chain[:usable]
        now = next(self._clock)
        for block in chain:
            block.last_used = now
        if chain:
            self.hits += 1
        return PrefixMatch(tokens=usable * self.block_tokens, blocks=chain)

    def load(self, match: PrefixMatch, cache: KVCache, row: int) -> None:
        """Copy the matched blocks' KV into a cache row (positions 0 .. match.tokens - 1), one write per layer."""
        if not match.blocks:
            return
        if self.full_layers:
            full = torch.cat([b.full_kv for b in match.blocks], dim=3)  # [L, 2, Hkv, m, D]
            for i, layer_idx in enumerate(self.full_layers):
                cache.write(layer_idx, row, 0, full[i])
        if self.sliding_layers:
            first = max(0, len(match.blocks) - self.blocks_needed)
            sliding = torch.cat([b.sliding_kv for b in match.blocks[first:]], dim=3)  # [L, 2, Hkv, n, D]
            for i, layer_idx in enumerate(self.sliding_layers):
                cache.write(layer_idx, row, first * self.block_tokens, sliding[i])

    # ---- insertion and eviction -------------------------------------------------------------------------
    def insert(self, tokens: list[int], limit: int, cache: KVCache, row: int, filled: int) -> None:
        """Add the complete blocks of `tokens[:limit]` from a cache row holding positions [0, filled)."""
        if self.budget_bytes <= 0:
            return
        bt = self.block_tokens
        # Sliding-layer KV is still in the ring at most for the last `ring size` positions, and after a load from
        # this cache only from the blocks it copied in: the row's stored positions say which it holds.
        ring_start = max((cache.held_from(i, row, filled) for i in self.sliding_layers), default=0)
        now = next(self._clock)
        node, chain, new = self.root, [], []
        for j, key in enumerate(self._chunks(tokens, limit)):
            child = node.children.get(key)
            if child is None:
                child = Block(tokens=key, parent=node, depth=j + 1)
                node.children[key] = child
                new.append(child)
            child.last_used = now
            chain.append(child)
            node = child
        # Copy out with one read per layer over the whole span, then one clone per block (blocks own their memory).
        if new and self.full_layers:
            start, end = (new[0].depth - 1) * bt, new[-1].depth * bt
            span = torch.stack([cache.read(i, row, start, end) for i in self.full_layers])  # [L, 2, Hkv, n, D]
            for block in new:
                block.full_kv = span[:, :, :, (block.depth - 1) * bt - start:block.depth * bt - start].clone()
                self.nbytes += block.full_kv.nbytes
        want = [b for b in chain if b.sliding_kv is None and (b.depth - 1) * bt >= ring_start]
        if want and self.sliding_layers:
            start, end = (want[0].depth - 1) * bt, want[-1].depth * bt
            span = torch.stack([cache.read(i, row, start, end) for i in self.sliding_layers])
            for block in want:
                block.sliding_kv = span[:, :, :, (block.depth - 1) * bt - start:block.depth * bt - start].clone()
                self.nbytes += block.sliding_kv.nbytes
        self._evict()

    def _evict(self) -> None:
        """Drop least-recently-used leaves until the budget holds (the blocks just inserted go last)."""
        if self.nbytes <= self.budget_bytes:
            return
        heap = [(b.last_used, id(b), b) for b in self._walk() if not b.children]
        heapq.heapify(heap)
        while self.nbytes > self.budget_bytes and heap:
            _, _, victim = heapq.heappop(heap)
            self.nbytes -= victim.nbytes
            parent = victim.parent
            del parent.children[victim.tokens]
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))

    def clear(self) -> None:
        self.root.children.clear()
        self.nbytes = 0
