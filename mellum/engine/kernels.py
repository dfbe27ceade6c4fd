"""CPU matrix-vector products for decode steps: the weight's rows split into blocks, one batched product.

A decode step multiplies a few activation rows by every weight matrix once, so it is bound by memory bandwidth.
On this machine's MKL, `F.linear` with one to sixteen rows runs on a single core and reads weights at 10–13 GB/s;
the same product written as `bmm` over two or four row blocks of the weight uses every core and reaches
15–19 GB/s (measured with weights larger than the caches: docs/engine.md). Mellum's own AVX2 kernel
(`mellum.engine.cpu_kernels`, used once loaded) streams the weight rows on every core at 20–25 GB/s; the `bmm`
remains the fallback where it cannot be built. Prefill (many rows) is compute-bound and keeps `F.linear`.

The split product is a parallel region per matrix: when other processes keep a core busy, each region waits for a
descheduled thread and the product collapses to under 1 GB/s (measured here with a training job beside it), while
single-threaded `F.linear` keeps its speed. `SplitSwitch` turns the split on and off, and `KernelChooser` lets the
engine keep whichever of the two its recent decode steps ran faster with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellum.engine import cpu_kernels

# Inputs with at most this many rows (decode, speculative verify, small batches) take the split product.
SPLIT_MAX_ROWS = 16


class SplitSwitch:
    """Shared on/off state of the `SplitLinear` layers of one model."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled


class KernelChooser:
    """Chooses between two kernel settings (True / False) from measured step times: it runs the current setting,
    tries the other one at steps 2, 4, 8, ... and then every `explore_every` steps, and switches when that step was
    `margin` times faster than the step just before it (adjacent steps do the same work, so one pair is a fair
    comparison). The early tries matter on a busy machine, where the wrong setting costs ~10x per step."""

    def __init__(self, explore_every: int = 64, margin: float = 0.8, initial: bool = True):
        self.explore_every, self.margin, self.current = explore_every, margin, initial
        self.steps, self.switches = 0, 0
        self._exploring = False
        self._last: float | None = None  # seconds of the latest step with the current setting

    def choose(self) -> bool:
        self.steps += 1
        early = self.steps < self.explore_every and self.steps & (self.steps - 1) == 0  # a power of two
        self._exploring = self._last is not None and (early or self.steps % self.explore_every == 0)
        return not self.current if self._exploring else self.current

    def record(self, seconds: float) -> None:
        if not self._exploring:
            self._last = seconds
        elif seconds < self.margin * self._last:
            self.current, self._last = not self.current, seconds
            self.switches += 1


class SplitLinear(nn.Linear):
    """A bias-free `nn.Linear` whose few-row products run as `bmm` over `splits` row blocks of the weight
    (while `switch.enabled`)."""

    def __init__(self, linear: nn.Linear, splits: int, switch: SplitSwitch | None = None):
        if linear.bias is not None:
            raise ValueError("SplitLinear takes bias-free layers only")
        out_features, in_features = linear.weight.shape
        if splits < 2 or out_features % splits:
            raise ValueError(f"{splits} splits do not divide {out_features} output features")
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = linear.weight  # shared, not copied (a tied output head stays tied)
        self.splits = splits
        self.switch = switch if switch is not None else SplitSwitch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = few_row_product(x.reshape(-1, self.in_features), self.weight, self.splits, self.switch)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}"


def few_row_product(x: torch.Tensor, weight: torch.Tensor, splits: int, switch: SplitSwitch) -> torch.Tensor:
    """x [M, In] @ weight [Out, In].T: for at most SPLIT_MAX_ROWS rows on CPU, while the switch is on, Mellum's
    kernel (fp32, once `cpu_kernels.load()` succeeded) or one `bmm` over `splits` row blocks of the weight (`splits`
    divides Out: `SplitLinear` checks it); `F.linear` otherwise."""
    rows, k = x.shape
    n, s = weight.shape[0], splits
    if rows > SPLIT_MAX_ROWS or not switch.enabled or x.device.type != "cpu" or x.dtype != weight.dtype:
        return F.linear(x, weight)
    if x.dtype == torch.float32 and weight.is_contiguous() and cpu_kernels.ready():
        return cpu_kernels.few_rows(x, weight)
    y = torch.bmm(weight.view(s, n // s, k), x.t().expand(s, k, rows))  # [s, N/s, M]
    return y.reshape(n, rows).t().contiguous()  # row-major [M, N], as F.linear returns


def split_linears(model: nn.Module, threads: int | None = None) -> SplitSwitch:
    """Replace every bias-free `nn.Linear` whose rows divide evenly by `SplitLinear`, in place; returns the switch
    they share. `threads`: the block count to aim for (default: torch's intra-op threads, at least 2)."""
    want = max(2, threads or torch.get_num_threads())
    switch = SplitSwitch()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.bias is not None:
                continue
            splits = next((s for s in (want, 4, 2) if child.out_features % s == 0), None)
            if splits:
                setattr(module, name, SplitLinear(child, splits, switch))
    return switch


def fuse_projections(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up projections of every attention and dense MLP module (see `Attention.fuse_projections`)."""
    for module in list(model.modules()):
        fuse = getattr(module, "fuse_projections", None)
        if callable(fuse):
            fuse()


FUSED_KEYS = {  # fused module key: the unfused keys concatenated into it, in order
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def fuse_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unfused model's state dict in the key layout of a model after `fuse_projections`."""
    out = dict(state)
    for key in state:
        for fused, parts in FUSED_KEYS.items():
            if key.endswith(parts[0]):
                base = key[: -len(parts[0])]
                out[base + fused] = torch.cat([out.pop(base + p) for p in parts])
    return out
