"""Prefix cache across requests: a tree of fixed-size token blocks holding their KV, evicted LRU under a byte budget.

Consecutive completion requests from one editor share most of their prompt (same context files, a prefix grown by
a few characters), so a new request copies the KV of its longest cached block prefix into its cache row and
prefills only the rest (the idea of vLLM's automatic prefix caching and SGLang's RadixAttention; llama.cpp's
`cache_prompt` keeps only the last prompt). Blocks are nodes of a tree keyed by their tokens under their parent,
so two prompts that differ in one early token share nothing after it, as attention requires.

Full-attention layers store KV for every block. Sliding-window layers need only the `window` keys before the
reuse point, so a block keeps sliding-layer KV only when it lay in the ring of its prompt's last `window + slack`
tokens (REFERENCE.md §4); a match is usable up to the deepest block whose preceding `window` tokens all kept it.

The MTP layer's entry at position t reads token t + 1 too (mellum.model.mtp), so the entry at a block's last
position depends on the token after the block, which the block's key does not fix: the block's KV holds it as
computed with the next token of the prompt that stored the block. Each block therefore also keeps its `mtp_head`,
the MTP entry at its parent's last position (computed with this block's first token), and `load` writes the heads
over the interior block ends. The last matched position's MTP entry stays unknown: the engine recomputes it.
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
    mtp_head: torch.Tensor | None = None  # [2, Hkv, 1, D]: the MTP layer's KV at the position before this block
    last_used: int = 0
    children: dict[tuple[int, ...], "Block"] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.full_kv, self.sliding_kv, self.mtp_head) if t is not None)


@dataclass
class PrefixMatch:
    """The reusable prefix of a prompt: `tokens` positions covered by `blocks`."""

    tokens: int
    blocks: list[Block]


class PrefixCache:
    """Token-block tree with KV per block; `match` → `load` before prefill, `insert` after it. `mtp_layer`: the
    cache layer of the MTP layer, whose entries also depend on the next token (None: no MTP layer cached)."""

    def __init__(self, budget_bytes: int, block_tokens: int, windows: list[int | None], mtp_layer: int | None = None):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.budget_bytes, self.block_tokens = int(budget_bytes), block_tokens
        self.mtp_layer = mtp_layer
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
        first = max(0, len(match.blocks) - self.blocks_needed) if self.sliding_layers else 0
        if self.full_layers:
            full = torch.cat([b.full_kv for b in match.blocks], dim=3)  # [L, 2, Hkv, m, D]
            for i, layer_idx in enumerate(self.full_layers):
                cache.write(layer_idx, row, 0, full[i])
        if self.sliding_layers:
            sliding = torch.cat([b.sliding_kv for b in match.blocks[first:]], dim=3)  # [L, 2, Hkv, n, D]
            for i, layer_idx in enumerate(self.sliding_layers):
                cache.write(layer_idx, row, first * self.block_tokens, sliding[i])
        if self.mtp_layer is not None:
            # The MTP entries at the ends of the blocks loaded before another matched block: their children's heads
            # (a sliding MTP layer loaded blocks from `first` on).
            heads = match.blocks[1 if self.mtp_layer in self.full_layers else first + 1:]
            if heads:
                kv = torch.cat([b.mtp_head for b in heads], dim=2)  # [2, Hkv, n, D]
                cache.write_at(self.mtp_layer, row, self._head_positions(heads), kv)

    def _head_positions(self, blocks: list[Block]) -> torch.Tensor:
        """The positions of the blocks' MTP heads: the last position of each one's parent."""
        return torch.tensor([(b.depth - 1) * self.block_tokens - 1 for b in blocks])

    # ---- insertion and eviction -------------------------------------------------------------------------
    def insert(self, tokens: list[int], limit: int, cache: KVCache, row: int, filled: int) -> None:
        """Add the complete blocks of `tokens[:limit]` from a cache row holding positions [0, filled)."""
        if self.budget_bytes <= 0:
            return
        bt = self.block_tokens
        # Sliding-layer KV is still in the ring at most for the last `ring size` positions, and after a load from
        # this cache only from the blocks it copied in: the row's stored positions say which it holds.
        held = {i: cache.held_from(i, row, filled) for i in self.sliding_layers}
        ring_start = max(held.values(), default=0)
        # A sliding MTP layer's block also needs its head, one position before it (none before the first block).
        head_from = held.get(self.mtp_layer, 0) + 1
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
        want = [b for b in chain if b.sliding_kv is None and (b.depth - 1) * bt >= ring_start
                and (b.depth == 1 or (b.depth - 1) * bt >= head_from)]
        if want and self.sliding_layers:
            start, end = (want[0].depth - 1) * bt, want[-1].depth * bt
            span = torch.stack([cache.read(i, row, start, end) for i in self.sliding_layers])
            for block in want:
                block.sliding_kv = span[:, :, :, (block.depth - 1) * bt - start:block.depth * bt - start].clone()
                self.nbytes += block.sliding_kv.nbytes
        if self.mtp_layer is not None:
            # Heads go with the MTP layer's KV: every new block (full layer), or every block given sliding KV now.
            self._store_heads(new if self.mtp_layer in self.full_layers else want, cache, row)
        self._evict()

    def _store_heads(self, blocks: list[Block], cache: KVCache, row: int) -> None:
        """Copy the MTP layer's entry at the position before each block (past the first) out of the row, where it
        was computed with the block's own first token as the next token (after a load, the engine prefilled again
        from the last matched position, the one entry `load` cannot know)."""
        blocks = [b for b in blocks if b.depth > 1 and b.mtp_head is None]
        if not blocks:
            return
        heads = cache.read_at(self.mtp_layer, row, self._head_positions(blocks))  # [2, Hkv, n, D]
        for i, block in enumerate(blocks):
            block.mtp_head = heads[:, :, i:i + 1].clone()
            self.nbytes += block.mtp_head.nbytes

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
