"""CUDA graphs for the single-sequence decode step: one captured graph per (cache row, key-length bucket).

Decoding one token of a 4B model launches ~1,800 small kernels; eager PyTorch spends ~80 ms/token on an H100
issuing them (measured), 30× the weight-bandwidth floor. Replaying a captured graph issues them at once.
Shapes inside a graph are fixed, so the key length is rounded up to a bucket (positions beyond the sequence are
masked by the cache's stored positions) and graphs are captured lazily per row and bucket, sharing one memory
pool. The mixture-of-experts layer's grouped path syncs with the host (expert counts) unless torch._grouped_mm runs
it; otherwise, for graph capture, its experts run a sync-free gathered form for the few tokens of a decode step
(`gathered_experts`).

A graph removes the launch cost but not the kernels: each RMSNorm, rotary embedding, residual and cast is still
several small kernels of a few microseconds. With the engine's `compile=True` the captured step is the layer loop
under `torch.compile` (dynamic shapes, so every key-length bucket shares one compiled graph), whose fused kernels
the graph then replays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Token-expert pairs up to which the gathered (sync-free) expert form replaces the grouped one.
GATHERED_MAX_PAIRS = 64


def gathered_experts(experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [N, C], weights/idx [N, K] -> [N, C], gathering each pair's expert weights (no host sync)."""
    n, k = idx.shape
    flat = idx.reshape(-1)  # [N*K]
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # [N*K, C, 1]
    gate, up = torch.bmm(experts.gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [N*K, I] each
    y = torch.bmm(experts.down_proj[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # [N*K, C]
    return (y * weights.reshape(-1, 1).to(y.dtype)).view(n, k, -1).sum(dim=1)  # [N, C]


def make_experts_graph_safe(model) -> None:
    """Route small expert batches of every `Experts` module through `gathered_experts` where the grouped form would
    sync with the host. Where `torch._grouped_mm` runs the grouped form (bf16 on Hopper-class GPUs) it stays on the
    GPU and reads only the experts in use, where the gathered form copies their weights before reading them again."""
    from mellum.model.moe import Experts, uses_grouped_mm

    for module in model.modules():
        if isinstance(module, Experts) and not hasattr(module, "_grouped_forward"):
            module._grouped_forward = module.forward

            def forward(x, weights, idx, _m=module):
                if idx.numel() <= GATHERED_MAX_PAIRS and not uses_grouped_mm(x):
                    return gathered_experts(_m, x, weights, idx)
                return _m._grouped_forward(x, weights, idx)

            module.forward = forward


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [1, 1, V] (static output)
    hidden: torch.Tensor  # [1, 1, C]
    view: object  # the cache view whose row-id tensor the graph reads: must outlive the graph


class GraphedDecode:
    """`run(row, kv_len, ids [1, T], positions [1, T], last_only)` → (logits, hidden) by graph replay, for the
    few-token forwards of decoding and speculative verification; captured on first use of each shape."""

    MAX_TOKENS = 16  # longest input (draft + 1) run through graphs

    def __init__(self, engine, bucket_tokens: int = 256, step=None):
        self.engine, self.bucket = engine, bucket_tokens
        # The forward each graph captures: the engine's layer loop, or `step`, the same loop under torch.compile
        # (compiled once per token count on the first capture's warm-up, outside the capture).
        self.step = step if step is not None else engine._layers_forward
        self.compiled = step is not None
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T → static (ids, positions) [1, T]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int, bool], _Graph] = {}
        self.sightings: dict[tuple[int, int, int, bool], int] = {}  # prefill shapes not captured yet: times seen
        make_experts_graph_safe(engine.model)

    def use_eager_step(self) -> None:
        """Capture the eager layer loop from now on (after the compiled step failed), dropping the graphs so far."""
        self.step, self.compiled = self.engine._layers_forward, False
        self.graphs.clear()

    def _step(self, view, t: int, last_only: bool):
        view._masks.clear()  # the masks must be computed inside the capture, not reused from the warm-up
        ids, positions = self.inputs[t]
        return self.step(ids, positions, view, last_only)

    def _bucket(self, kv_len: int) -> int:
        return min(math.ceil(kv_len / self.bucket) * self.bucket, self.engine.max_len)

    def wants_prefill(self, row: int, kv_len: int, t: int, last_only: bool) -> bool:
        """Whether a prefill chunk of this shape replays a graph: one is captured already, or the shape was seen once
        before. A keystroke's few new tokens recur in the same row and key bucket, so its chunk is graphed from the
        second keystroke on; a one-off shape stays eager (capturing costs more than one eager forward)."""
        key = (row, self._bucket(kv_len), t, last_only)
        if key in self.graphs:
            return True
        self.sightings[key] = self.sightings.get(key, 0) + 1
        return self.sightings[key] >= 2

    def run(self, row: int, kv_len: int, ids: torch.Tensor, positions: torch.Tensor, last_only: bool):
        t = ids.shape[1]
        kv = self._bucket(kv_len)
        if t not in self.inputs:
            self.inputs[t] = (torch.zeros_like(ids), torch.zeros_like(positions))
        self.inputs[t][0].copy_(ids)
        self.inputs[t][1].copy_(positions)
        key = (row, kv, t, last_only)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(row, kv, t, last_only)
        entry.graph.replay()
        return entry.logits, entry.hidden

    def _capture(self, row: int, kv: int, t: int, last_only: bool) -> _Graph:
        # Warm-up on a side stream (the documented recipe); it runs the real step, writing the same KV slot
        # that the replay after capture writes again.
        # Built outside the capture (it copies its row ids to the GPU); padded: kv is a bucket, not the exact length.
        view = self.engine.cache.view([row], kv, padded=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(view, t, last_only)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, hidden = self._step(view, t, last_only)
        return _Graph(graph, logits, hidden, view)
