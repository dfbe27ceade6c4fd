"""Pre-training losses: next-token cross-entropy, MoE load-balancing and router z-loss, and the MTP loss.

The router losses are Switch-Transformer load balancing (arXiv:2101.03961) and ST-MoE z-loss (arXiv:2202.08906),
computed by `mellum.model.moe` over each micro-batch's tokens (padding excluded).

Every function is pure (tensors in, scalar tensor out). Token losses are *sums* divided by a caller-given
count, so that gradient accumulation and data-parallel ranks add up to exactly the mean over the global batch.
Legend: B batch, T time, V vocabulary, E experts, K experts per token, N tokens (B·T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The router losses are the model's own pure functions (one definition for training and tests).
from mellum.model.moe import load_balancing_loss, router_z_loss

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens)


def valid_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets with every negative id mapped to IGNORE (loaders may mark ignored positions with any negative)."""
    return targets.masked_fill(targets < 0, IGNORE)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits [B, T, V] against targets [B, T] (IGNORE skipped), in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), valid_targets(targets).reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def mtp_inputs_and_targets(
    targets: torch.Tensor, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the depth-1 multi-token-prediction head (DeepSeek-V3 §2.2, arXiv:2412.19437).

    At position t the main model predicts x[t+1] = targets[t]; the MTP layer is given that token (`next_ids`)
    and predicts x[t+2] = targets[t+1]. The last position has no such target, and neither does a position whose
    next token already starts another packed document. Returns (next_ids [B, T], mtp_targets [B, T]).
    """
    targets = valid_targets(targets)
    next_ids = targets.clamp(min=0)  # [B, T]: ignored positions feed token 0; their MTP targets are ignored below
    mtp_targets = torch.full_like(targets, IGNORE)
    mtp_targets[:, :-1] = targets[:, 1:]
    mtp_targets[:, :-1].masked_fill_(targets[:, :-1] == IGNORE, IGNORE)
    if doc_ids is not None:
        crosses = doc_ids[:, 1:] != doc_ids[:, :-1]  # [B, T-1]: x[t+1] starts a new document
        mtp_targets[:, :-1].masked_fill_(crosses, IGNORE)
    return next_ids, mtp_targets


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of the auxiliary terms (taken from the model config: router_aux_loss_coef, ...)."""

    router_aux: float = 0.0
    router_z: float = 0.0
    mtp: float = 0.0
    top_k: int = 0

    @classmethod
    def from_config(cls, config) -> "LossWeights":
        moe = config.num_experts > 0
        return cls(
            router_aux=config.router_aux_loss_coef if moe else 0.0,
            router_z=config.router_z_loss_coef if moe else 0.0,
            mtp=config.mtp_loss_weight if config.num_mtp_layers > 0 else 0.0,
            top_k=config.num_experts_per_tok,
        )


def pretraining_loss(
    model, batch: dict[str, torch.Tensor], weights: LossWeights, num_targets: float, doc_masking: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of one micro-batch and its detached parts.

    `num_targets` is the number of non-ignored targets in the whole global batch (all micro-batches, all
    ranks): the next-token and MTP terms are sums over this micro-batch divided by it, so gradients accumulate
    to the global mean. Router terms are per-micro-batch means, scaled by this micro-batch's share of targets.
    """
    input_ids, targets = batch["input_ids"], batch["targets"]
    # Packed rows: positions restart and attention stays inside each document, unless `doc_masking` is off
    # (plain causal attention over the whole row, the faster fused kernel on GPUs).
    positions, doc_ids = (batch.get("positions"), batch.get("doc_ids")) if doc_masking else (None, None)
    out = model(input_ids, positions=positions, doc_ids=doc_ids)
    ce_sum = token_loss_sum(out.logits, targets)
    share = (valid_targets(targets) != IGNORE).sum().float() / num_targets
    total = ce_sum / num_targets
    parts = {"ce_sum": ce_sum.detach()}
    if weights.router_aux or weights.router_z:
        router = [r for r in (out.router_logits or []) if r is not None]
        if router:
            if weights.router_aux:
                aux = load_balancing_loss(router, weights.top_k)
                total = total + weights.router_aux * aux * share
                parts["router_aux"] = aux.detach()
            if weights.router_z:
                z = router_z_loss(router)
                total = total + weights.router_z * z * share
                parts["router_z"] = z.detach()
    if weights.mtp:
        next_ids, mtp_targets = mtp_inputs_and_targets(targets, doc_ids)
        mtp_logits = _mtp_module(model)(out.hidden, next_ids, positions, None, doc_ids)  # [B, T, V]
        mtp_sum = token_loss_sum(mtp_logits, mtp_targets)
        total = total + weights.mtp * mtp_sum / num_targets
        parts["mtp_sum"] = mtp_sum.detach()
        parts["mtp_targets"] = (mtp_targets != IGNORE).sum()  # positions with a token t+2 (held-out means)
    return total, parts


def _mtp_module(model):
    # FSDP-wrapped and plain models both expose the submodule as an attribute.
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        raise ValueError("mtp loss weight is set but the model has no `mtp` module (config.num_mtp_layers = 0)")
    return mtp
