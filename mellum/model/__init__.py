"""The model: architecture only (norm, rotary, attention, MLP/MoE, MTP, transformer); checkpoints live in mellum.checkpoint."""

from mellum.model.attention import attention_mask
from mellum.model.cache import DenseKVCache
from mellum.model.moe import load_balancing_loss, router_z_loss
from mellum.model.mtp import mtp_loss, next_token_ids
from mellum.model.transformer import ModelOutput, Transformer, init_weights

__all__ = [
    "DenseKVCache",
    "ModelOutput",
    "Transformer",
    "attention_mask",
    "init_weights",
    "load_balancing_loss",
    "mtp_loss",
    "next_token_ids",
    "router_z_loss",
]
