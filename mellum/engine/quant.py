"""Int8 weight-only quantization with one scale per output channel, applied to a model's linear layers in place.

Decoding one token reads every weight once, so on a bandwidth-bound CPU int8 weights (1 byte instead of 4) cut
the decode floor about 4×. For a few rows (decode, speculative verify) the CPU path uses
Mellum's kernel (`mellum.engine.cpu_kernels.few_rows_int8`: activations rounded to int16 per row, integer products,
every core) once it is loaded, else `torch._weight_int8pack_mm` with bf16 activations (≈3× faster than fp32
`F.linear` here, REFERENCE.md §4; the kernel is 1.5–2× faster again and its int16 activations are finer than bf16); larger inputs
(prefill) dequantize and run the fp32 matmul, where compute, not bandwidth, is the bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellum.engine import cpu_kernels

# Inputs with at most this many rows take the int8 kernel on CPU; more rows dequantize (prefill is compute-bound).
INT8_KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 [out, in] and scale [out] (symmetric, per output channel)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)  # [out, in]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, in]
        few_rows = x.device.type == "cpu" and x2.shape[0] <= INT8_KERNEL_MAX_ROWS
        if few_rows and x.dtype == self.scale.dtype == torch.float32 and cpu_kernels.ready():
            y = cpu_kernels.few_rows_int8(x2, self.qweight, self.scale)
        elif few_rows:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("router", "gate")) -> nn.Module:
    """Replace every bias-free `nn.Linear` (names in `skip` excepted) by `Int8Linear`, in place; returns the model.

    Routers (their own module, not nn.Linear) and fused expert tensors stay in full precision.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and not any(s == child_name for s in skip):
                setattr(module, child_name, Int8Linear(child.weight))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers read by a forward (the decode bandwidth floor's numerator)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
