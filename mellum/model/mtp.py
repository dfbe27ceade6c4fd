"""Multi-token prediction layer of Mellum 2 (DeepSeek-V3 §2.2, arXiv:2412.19437): predicts token t+2.

At position t it combines the main model's last hidden state h_t with the embedding of token t+1:
x = fc([norm_e(emb(ids[t+1])); norm_h(h_t)]), runs one decoder layer (layer index = num_layers for the KV cache),
then the final norm and the shared output head. Keys live under `mtp.` (REFERENCE.md §2; the Qwen3-Next order
"embedding first" in the concatenation is assumed — the table in mellum.checkpoint is the one place to fix).
Used as an auxiliary training loss (`mtp_loss`) and as the built-in draft model for speculative decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mellum.model.norm import RMSNorm


class MTP(nn.Module):
    def __init__(self, config, parent: nn.Module):
        super().__init__()
        from mellum.model.transformer import Block

        c = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(c, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(c, config.rms_norm_eps)
        self.fc = nn.Linear(2 * c, c, bias=False)
        self.layers = nn.ModuleList([Block(config, config.num_layers)])
        self.norm = RMSNorm(c, config.rms_norm_eps)
        # The embedding, rotary tables and output head are the main model's; a list keeps them unregistered
        # here, so their weights keep a single key each.
        self._parent = [parent]

    def combine(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The layer's input: hidden [B, T, C] and token t+1's embedding, each normalised, concatenated and
        projected -> [B, T, C]."""
        e = self.pre_fc_norm_embedding(self._parent[0].embed_tokens(next_ids))  # [B, T, C]
        h = self.pre_fc_norm_hidden(hidden)  # [B, T, C]
        return self.fc(torch.cat([e, h], dim=-1))  # [B, T, 2C] -> [B, T, C]

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        doc_ids: torch.Tensor | None = None,
        return_router_logits: bool = False,
        return_hidden: bool = False,
    ):
        """hidden [B, T, C] (ModelOutput.hidden), next_ids [B, T] (token t+1 at t) -> logits [B, T, V] for t+2;
        with `return_hidden`, (logits, the layer's output before the final norm [B, T, C]) — the hidden state a
        chained draft feeds back in place of the main model's."""
        parent = self._parent[0]
        x = self.combine(hidden, next_ids)
        layer = self.layers[0]
        positions, layer_inputs = parent.layer_inputs(positions, doc_ids, cache, next_ids.shape, x.dtype)
        x, router = layer(x, *layer_inputs[layer.layer_type], positions, cache)
        logits = parent.lm_head(self.norm(x))
        if return_router_logits:
            return logits, [] if router is None else [router]
        if return_hidden:
            return logits, x
        return logits


def next_token_ids(input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[B, T] -> [B, T]: token t+1 at position t (the MTP layer's second input); the last column is `pad_id`."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), pad_id)], dim=1)


def mtp_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of MTP logits [B, T, V] against token t+2, never across a document boundary.

    Position t is trained only when t+2 < T and tokens t, t+1, t+2 share a document (`doc_ids` [B, T]) — in a
    packed sequence the MTP prediction would otherwise learn to guess the start of an unrelated file.
    `labels` [B, T] (default `input_ids`) may hold `ignore_index` for positions without loss (SFT prompts).
    """
    b, t, v = logits.shape
    if t < 3:
        return logits.sum() * 0.0
    targets = (input_ids if labels is None else labels)[:, 2:].clone()  # [B, T-2]
    if doc_ids is not None:
        same = (doc_ids[:, :-2] == doc_ids[:, 1:-1]) & (doc_ids[:, 1:-1] == doc_ids[:, 2:])  # [B, T-2]
        targets[~same] = ignore_index
    pred = logits[:, :-2].reshape(-1, v).float()  # [B*(T-2), V]
    if (targets != ignore_index).sum() == 0:
        return pred.sum() * 0.0
    return F.cross_entropy(pred, targets.reshape(-1), ignore_index=ignore_index)
