"""The decoder-only transformer shared by Mellum-4B (dense Llama) and Mellum 2 (MoE, sliding windows, MTP).

Module names follow the Hugging Face checkpoints minus the `model.` prefix, so the key table in
`mellum.checkpoint` stays a short, explicit list. Shapes: B batch, T tokens, C width, V vocabulary, E experts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mellum.config import ModelConfig
from mellum.model.attention import Attention, attention_mask
from mellum.model.mlp import MLP
from mellum.model.moe import MoE, Experts, Router
from mellum.model.norm import RMSNorm
from mellum.model.rotary import RotaryEmbedding


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, C] last hidden state before the final norm (the MTP layer's input)
    router_logits: list[torch.Tensor]  # one [B*T, E] per sparse layer, in layer order


class Block(nn.Module):
    """Pre-norm decoder layer: attention then MLP (dense SwiGLU or mixture of experts), each with a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.all_layer_types[layer_idx]
        self.sparse = config.all_mlp_types[layer_idx] == "sparse"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if self.sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, mask, positions, cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, positions, mask, cache)
        h, router_logits = self.feed_forward(self.post_attention_layernorm(x))
        return x + h, router_logits

    def feed_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mlp(x) if self.sparse else (self.mlp(x), None)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One rotary table per attention type; YaRN only on full-attention layers (see rotary.py).
        self.rotary = nn.ModuleDict(
            {
                "full_attention": RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling),
                "sliding_attention": RotaryEmbedding(config.head_dim, config.rope_theta_sliding),
            }
        )
        if config.num_mtp_layers:
            from mellum.model.mtp import MTP

            self.mtp = MTP(config, self)
        init_weights(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        doc_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T]; positions [B, T] (default arange(T)); doc_ids [B, T] keeps attention inside documents."""
        x = self.embed_tokens(input_ids)  # [B, T, C]
        positions, layer_inputs = self.layer_inputs(positions, doc_ids, cache, input_ids.shape, x.dtype)
        router_logits = []
        for layer in self.layers:
            x, r = layer(x, *layer_inputs[layer.layer_type], positions, cache)
            if r is not None:
                router_logits.append(r)
        return ModelOutput(self.lm_head(self.norm(x)), x, router_logits)

    def layer_inputs(self, positions, doc_ids, cache, shape, dtype):
        """Positions [B, T] and, per attention type, (cos/sin [B, T, D], mask [B, 1, T, T] or None).

        Masks are built once per forward and type, vectorised. With a cache the cache builds the mask from its
        stored key positions; with default positions and no documents, full attention uses SDPA's causal path.
        """
        b, t = shape
        default = positions is None
        if default:
            positions = torch.arange(t, device=self.embed_tokens.weight.device).expand(b, t)  # [B, T]
        out = {}
        for layer_type in set(self.config.all_layer_types):
            rope = self.rotary[layer_type](positions, dtype)
            window = self.config.sliding_window if layer_type == "sliding_attention" else None
            if cache is not None or (default and doc_ids is None and window is None):
                mask = None
            else:
                mask = attention_mask(positions, positions, window, doc_ids, doc_ids)  # [B, 1, T, T]
            out[layer_type] = (rope, mask)
        return positions, out

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype


@torch.no_grad()
def init_weights(model: Transformer) -> None:
    """All initialisation in one place: N(0, init_std) for matrices, ones for norms, and residual output
    projections scaled by 1/sqrt(2 * layers) (GPT-2, Radford et al. 2019 §2.3)."""
    config = model.config
    std = config.init_std
    out_std = std / math.sqrt(2 * (config.num_layers + config.num_mtp_layers))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scaled = name.endswith("o_proj") or name.endswith("down_proj")
            nn.init.normal_(module.weight, 0.0, out_std if scaled else std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, 0.0, std)
            nn.init.normal_(module.down_proj, 0.0, out_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
