"""Int8 weight-only quantization with one scale per output channel, applied to a model's linear layers in place.

Decoding one token reads every weight once, so on a bandwidth-bound CPU int8 weights (1 byte instead of 4) cut
the decode floor about 4×. For a few rows (decode, speculative verify) the CPU path uses
Mellum's kernel (`mellum.engine.cpu_kernels.few_rows_int8`: activations rounded to int16 per row, integer products,
every core) once it is loaded, else `torch._weight_int8pack_mm` with bf16 activations (≈3× faster than fp32
`F.linear` here, REFERENCE.md §4; the kernel is 1.5–2× faster again and its int16 activations are finer than bf16); larger inputs
(prefill) dequantize and run the fp32 matmul, where compute, not bandwidth, is the bound. A mixture's experts are
quantized the same way, expert by expert (`Int8Experts`); routers stay in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellum.engine import cpu_kernels

# Inputs with at most this many rows take the int8 kernel on CPU; more rows dequantize (prefill is compute-bound).
INT8_KERNEL_MAX_ROWS = 16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (int8 [..., out, in], scale [..., out] in weight's dtype): symmetric, one scale per
    output row (its largest |w| maps to 127)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(w / scale[..., None]), -127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def int8_product(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ (qweight [out, in] * scale [out, 1]).T: Mellum's kernel or int8pack for few CPU rows, else the
    dequantized fp32 product."""
    few_rows = x.device.type == "cpu" and x.shape[0] <= INT8_KERNEL_MAX_ROWS
    if few_rows and x.dtype == scale.dtype == torch.float32 and cpu_kernels.ready():
        return cpu_kernels.few_rows_int8(x, qweight, scale)
    if few_rows:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale.to(torch.bfloat16)).to(x.dtype)
    return F.linear(x, (qweight.to(scale.dtype) * scale[:, None]).to(x.dtype))


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with q int8 [out, in] and scale [out] (symmetric, per output channel)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int8_product(x.reshape(-1, shape[-1]), self.qweight, self.scale)  # [N, out]
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Experts(nn.Module):
    """A mixture's experts (`mellum.model.moe.Experts`) in int8: every expert's gate/up [2I, C] and down [C, I] rows
    with one scale each, as `Int8Linear`. Per expert, few rows take the int8 kernel; more rows (prefill) the
    dequantized product of that expert alone."""

    def __init__(self, experts):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_rows(getattr(experts, name))  # [E, out, in], [E, out]
            self.register_buffer(f"q{name}", q)
            self.register_buffer(f"{name}_scale", scale)

    def dequantize(self, name: str) -> torch.Tensor:
        """The float [E, out, in] weights of "gate_up_proj" or "down_proj"."""
        scale = getattr(self, f"{name}_scale")
        return getattr(self, f"q{name}").to(scale.dtype) * scale[..., None]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        from mellum.model.moe import mix_experts, per_group

        def grouped(name):
            q, scale = getattr(self, f"q{name}"), getattr(self, f"{name}_scale")
            return lambda rows, counts: per_group(rows, counts, q.shape[1], lambda r, e: int8_product(r, q[e], scale[e]))

        return mix_experts(x, weights, experts, self.num_experts, grouped("gate_up_proj"), grouped("down_proj"))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, int8 per-channel"


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ("router", "gate"), experts: bool = True) -> nn.Module:
    """Replace every bias-free `nn.Linear` (names in `skip` excepted) by `Int8Linear`, and with `experts` every
    mixture's `Experts` by `Int8Experts`, in place; returns the model. Routers (their own module) stay in float."""
    from mellum.model.moe import Experts

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and not any(s == child_name for s in skip):
                setattr(module, child_name, Int8Linear(child.weight))
            elif experts and isinstance(child, Experts):
                setattr(module, child_name, Int8Experts(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers read by a forward (the decode bandwidth floor's numerator)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
