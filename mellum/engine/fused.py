"""The fused CPU decode forward (csrc/decoder.cpp): every layer of the model (dense or mixture-of-experts) for a few
new tokens (one or several sequences) in one C++ call, instead of ~40 PyTorch operators per layer.

`FusedDecoder.build(model, cache)` returns None, with the reason, where it does not apply: not a `Transformer`,
weights other than fp32 or int8-with-fp32-scales (routers: fp32), projections not fused, or Mellum's kernels not
loaded. The engine then keeps the layer-by-layer forward, which stays the reference: both write the
same cache entries and give the same tokens (tests/engine/test_fused_decode.py). `build(model, cache, mtp=True)`
is a decoder of the MTP layer alone, fed its combined input through `forward_hidden` (the engine's MTP drafts).
"""

from __future__ import annotations

import torch
from torch import nn

from mellum.engine import cpu_kernels
from mellum.engine.kv_cache import KVCache
from mellum.engine.quant import Int8Experts, Int8Linear

MAX_TOKENS = 16  # tokens per call (B rows x T tokens: batched decode, speculative verify, short prefill chunks)


def _linear(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scale) of a bias-free linear layer the kernel reads: fp32 weight and an empty scale, or int8
    weight and fp32 per-row scales; None otherwise."""
    if isinstance(module, Int8Linear):
        if module.scale.dtype == torch.float32:
            return module.qweight, module.scale
        return None
    if isinstance(module, nn.Linear) and module.bias is None and module.weight.dtype == torch.float32:
        return module.weight.detach(), torch.empty(0)
    return None


def _experts(experts, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [E, N, K], scales) of a mixture's stacked expert weights: fp32 and an empty scale, or int8 and fp32
    scales [E, N] (`Int8Experts`); None otherwise."""
    if isinstance(experts, Int8Experts):
        q, scale = getattr(experts, f"q{name}"), getattr(experts, f"{name}_scale")
        return (q, scale) if scale.dtype == torch.float32 and q.is_contiguous() and scale.is_contiguous() else None
    w = getattr(experts, name).detach()
    return (w, torch.empty(0)) if w.dtype == torch.float32 and w.is_contiguous() else None


class FusedDecoder:
    """Calls the C++ decoder over the engine's weights and KV cache (shared, not copied: `load_weights` and the
    prefix cache's copies act on the same memory)."""

    def __init__(self, decoder, max_run: int):
        self._decoder, self.max_run = decoder, max_run  # max_run: consecutive tokens per row a call may take

    def fits(self, ids: torch.Tensor) -> bool:
        """Whether a forward of ids [B, T] can run fused (at most MAX_TOKENS in all, sliding rings permitting)."""
        return ids.numel() <= MAX_TOKENS and ids.shape[1] <= self.max_run

    @classmethod
    def build(cls, model, cache: KVCache, mtp: bool = False) -> tuple["FusedDecoder | None", str]:
        """(decoder, "") or (None, why not). `mtp`: a decoder of the MTP layer alone (its block on cache layer
        num_layers, its own final norm, the shared output head), called with `forward_hidden`."""
        if not cpu_kernels.ready() or not hasattr(torch.classes.mellum, "Decoder"):
            return None, "Mellum's CPU kernels are not loaded"
        config = getattr(model, "config", None)
        layers = getattr(model, "layers", None)
        if config is None or layers is None or not hasattr(model, "embed_tokens"):
            return None, "not a mellum Transformer"
        final_norm, first = model.norm.weight, 0
        if mtp:
            if getattr(model, "mtp", None) is None or len(cache.layers) <= config.num_layers:
                return None, "no MTP layer, or no cache layer for it"
            layers, final_norm, first = model.mtp.layers, model.mtp.norm.weight, config.num_layers
        if cache.device.type != "cpu" or cache.dtype not in (torch.float32, torch.float16):
            return None, "the KV cache is not float32 or float16 on CPU"
        if model.embed_tokens.weight.dtype != torch.float32:
            return None, "the weights are not float32"
        lm_head = _linear(model.lm_head)
        if lm_head is None:
            return None, "the output head is neither fp32 nor int8 with fp32 scales"
        tensors, caches, inv_freqs, factors = [], [], [], []
        empty = torch.empty(0)
        for i, block in enumerate(layers):
            attn, mlp = block.self_attn, block.mlp
            qkv, o = _linear(getattr(attn, "qkv_proj", None)), _linear(attn.o_proj)
            router = empty
            if block.sparse:  # the experts' stacked weights take the dense projections' places, with the router
                gate_up, down = _experts(mlp.experts, "gate_up_proj"), _experts(mlp.experts, "down_proj")
                router = mlp.gate.weight.detach()
                if None in (gate_up, down) or router.dtype != torch.float32 or not router.is_contiguous():
                    return None, f"layer {i}: experts not contiguous fp32 or int8 with fp32 scales, or router not fp32"
            else:
                gate_up, down = _linear(getattr(mlp, "gate_up_proj", None)), _linear(mlp.down_proj)
            if None in (qkv, o, gate_up, down):
                return None, f"layer {i}: projections not fused, or weights neither fp32 nor int8"
            qk = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (empty, empty)
            if any(n.dtype != torch.float32 for n in (block.input_layernorm.weight,
                                                      block.post_attention_layernorm.weight, *qk)):
                return None, f"layer {i}: norms are not float32"
            tensors += [block.input_layernorm.weight, *qkv, *o, block.post_attention_layernorm.weight, *gate_up,
                        *down, *qk, router]
            kv = cache.layers[first + i]
            caches += [kv.k, kv.v, kv.pos]
            rotary = model.rotary[block.layer_type]
            inv_freqs.append(rotary.inv_freq.float().contiguous())
            factors.append(float(rotary.attention_factor))
        tensors = [t.detach() for t in tensors]
        own = cache.layers[first:first + len(layers)]
        windows = [kv.window or 0 for kv in own]
        # A call's new entries must not overwrite, in a sliding ring, a key that an earlier of them still sees.
        max_run = min([MAX_TOKENS] + [kv.size - kv.window + 1 for kv in own if kv.window])
        if max_run < 1:
            return None, "sliding rings without room for one token"
        dims = [config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size,
                config.vocab_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                int(config.norm_topk_prob)]
        decoder = torch.classes.mellum.Decoder(
            dims, float(config.rms_norm_eps), model.embed_tokens.weight.detach(), final_norm.detach(), *lm_head,
            tensors, caches, windows, inv_freqs, factors)
        return cls(decoder, max_run), ""

    def __call__(self, ids: torch.Tensor, rows: list[int], starts: list[int], last_only: bool,
                 one_thread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] (int64): row b's tokens at positions starts[b]..starts[b]+T-1 of cache row rows[b] →
        (logits [B, T or 1, V], hidden [B, T, C]), as the engine's layer-by-layer forward returns them.
        `one_thread`: all work on the calling thread (identical results; the kernel chooser's busy-machine setting)."""
        return self._decoder.forward(ids.contiguous(), rows, starts, last_only, one_thread)

    def forward_hidden(self, x: torch.Tensor, rows: list[int], starts: list[int], last_only: bool,
                       one_thread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from first-layer inputs x [B, T, C] (float32) instead of token ids (the MTP decoder)."""
        return self._decoder.forward_hidden(x, rows, starts, last_only, one_thread)
