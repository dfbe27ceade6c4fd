"""Optimizers of pre-training: Muon for the hidden weight matrices, AdamW for everything else.

Moonlight (arXiv:2502.16982 §2.2) scales Muon's orthogonalised update by 0.2·sqrt(max(A, B)) so its RMS matches
AdamW's (≈ 0.2); then one learning rate and weight decay serve both optimizers, as in Mellum 2 (REFERENCE.md §2).
Muon only suits matrices that act on hidden states: embeddings, the output head, norms, biases and MoE routers
stay with AdamW (Keller Jordan's Muon notes; Moonlight §2). `torch.optim.Muon` (torch ≥ 2.9) handles 2-D matrices on GPUs;
`NewtonSchulzMuon` below is the same algorithm for torches without it, for CPUs (fp32), for FSDP-sharded
parameters and for stacked 3-D expert weights [E, A, B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Quintic Newton–Schulz coefficients of Keller Jordan's Muon (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True)
class OptimConfig:
    """Learning rate and the two optimizers' settings. `adamw_name_parts`: parameter-name pieces kept on AdamW."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon: bool = True  # False: AdamW for every parameter
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    grad_clip: float = 1.0
    # Which 2-D matrices are *not* hidden matrices. Names follow the model's modules (mellum.model).
    adamw_name_parts: tuple[str, ...] = ("embed", "lm_head", "output", "router", "gate.weight", "norm")


def zeropower_newton_schulz(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each trailing [A, B] matrix of `grad` (U S Vᵀ → U S' Vᵀ, S' ≈ 1).

    Works on [A, B] or stacked [E, A, B]. Iterates on the wide orientation (A ≤ B) so the Gram matrix is small;
    in bf16 on GPUs as in the reference implementation, in fp32 on CPUs (no fast bf16 there).
    """
    a, b, c = NS_COEFFICIENTS
    x = grad.bfloat16() if grad.is_cuda else grad.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT  # [.., A, A]
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    if tall:
        x = x.mT
    return x.to(grad.dtype)


def moonlight_scale(shape: torch.Size) -> float:
    """0.2·sqrt(max(A, B)) for a matrix [.., A, B]: matches the update RMS of AdamW (Moonlight §2.2)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class NewtonSchulzMuon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and decoupled weight decay, for [A, B] and stacked [E, A, B] parameters.

    Same update as `torch.optim.Muon(..., adjust_lr_fn="match_rms_adamw")`:
    buf ← μ·buf + (1−μ)·g; u = NS(lerp(g, buf, μ)); p ← p·(1 − lr·wd) − lr·0.2·sqrt(max(A, B))·u.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError(f"Muon needs matrices, got a parameter of shape {tuple(p.shape)}")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = _orthogonalise(update, group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * moonlight_scale(p.shape))
        return loss


def uses_muon(name: str, param: torch.Tensor, config: OptimConfig) -> bool:
    """True for hidden weight matrices (2-D, or stacked 3-D experts) that are not embeddings/head/router/norms."""
    if not config.muon or param.ndim not in (2, 3):
        return False
    return not any(part in name for part in config.adamw_name_parts)


def split_parameters(model: nn.Module, config: OptimConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters grouped as 'muon' (2-D), 'muon_stacked' (3-D experts), 'adamw_decay' and 'adamw_no_decay'.

    Embedding and output-head matrices are decayed (as in Moonlight's AdamW); 1-D norms and biases are not.
    """
    groups: dict[str, list] = {"muon": [], "muon_stacked": [], "adamw_decay": [], "adamw_no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if uses_muon(name, p, config):
            groups["muon" if p.ndim == 2 else "muon_stacked"].append((name, p))
        elif p.ndim >= 2:
            groups["adamw_decay"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    return groups


def build_optimizers(model: nn.Module, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """The optimizers of one model, each group carrying `base_lr` for the schedule to scale."""
    groups = split_parameters(model, config)
    optimizers: list[torch.optim.Optimizer] = []
    adamw_groups = [
        {"params": [p for _, p in groups["adamw_decay"]], "weight_decay": config.weight_decay},
        {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0},
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=config.lr, betas=config.betas, eps=config.eps))
    matrices = [p for _, p in groups["muon"]]
    if matrices:
        muon_cls = getattr(torch.optim, "Muon", None)
        # torch.optim.Muon iterates in bf16, which this kind of CPU computes ~500× slower than fp32: CPUs (and
        # FSDP's DTensors, which torch's Muon does not take) use our fp32/gathering implementation instead.
        torch_muon = None
        if muon_cls is not None and matrices[0].is_cuda and not _is_dtensor(matrices[0]):
            try:
                torch_muon = muon_cls(matrices, lr=config.lr, weight_decay=config.weight_decay,
                                      momentum=config.muon_momentum, ns_steps=config.muon_ns_steps,
                                      adjust_lr_fn="match_rms_adamw")
            except TypeError:  # a torch whose Muon predates adjust_lr_fn: ours has the Moonlight scaling
                torch_muon = None
        if torch_muon is not None:
            optimizers.append(torch_muon)
        else:
            optimizers.append(NewtonSchulzMuon(matrices, lr=config.lr, weight_decay=config.weight_decay,
                                               momentum=config.muon_momentum, ns_steps=config.muon_ns_steps))
    stacked = [p for _, p in groups["muon_stacked"]]
    if stacked:
        optimizers.append(NewtonSchulzMuon(stacked, lr=config.lr, weight_decay=config.weight_decay,
                                           momentum=config.muon_momentum, ns_steps=config.muon_ns_steps))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = config.lr
    return optimizers


def set_lr_factor(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Scale every group's learning rate to base_lr × factor; returns the resulting peak-relative LR."""
    lr = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
            lr = group["lr"]
    return lr


def _is_dtensor(p: torch.Tensor) -> bool:
    # FSDP2 shards parameters as DTensors along dim 0; torch.optim.Muon works on plain tensors only.
    return type(p).__name__ == "DTensor"


def _orthogonalise(update: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """Newton–Schulz of a plain tensor, or of an FSDP2-sharded DTensor via its gathered full matrix.

    Every rank gathers the whole matrix and orthogonalises it redundantly (simple and exact; at large scale the
    work would be spread over ranks, as in Moonlight's distributed Muon), then keeps its own shard.
    """
    if not _is_dtensor(update):
        return zeropower_newton_schulz(update, steps, eps)
    from torch.distributed.tensor import distribute_tensor

    full = zeropower_newton_schulz(update.full_tensor(), steps, eps)
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
