"""The grouped MoE against a per-expert loop, router losses, and layer-selective YaRN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mellum.config import get_config
from mellum.model import Transformer, load_balancing_loss, router_z_loss
from mellum.model.moe import MoE
from mellum.model.rotary import RotaryEmbedding, yarn_inv_freq


def per_expert_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Readable MoE: for every token, softmax over experts, take the top k, renormalise, sum the expert MLPs."""
    out = torch.zeros_like(x)
    i = moe.experts.gate_up_proj.shape[1] // 2
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n] @ moe.gate.weight.T, dim=-1)
        top = torch.topk(probs, moe.gate.top_k)
        weights = top.values / top.values.sum()
        for w, e in zip(weights, top.indices.tolist()):
            gate_w, up_w = moe.experts.gate_up_proj[e, :i], moe.experts.gate_up_proj[e, i:]
            h = F.silu(gate_w @ x[n]) * (up_w @ x[n])
            out[n] += w * (moe.experts.down_proj[e] @ h)
    return out


def test_grouped_moe_matches_per_expert_loop():
    config = get_config("tiny-moe")
    torch.manual_seed(0)
    moe = Transformer(config).layers[1].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)  # spread the routing over all experts
    x = torch.randn(3, 11, config.hidden_size)
    with torch.no_grad():
        y, logits = moe(x)
    assert logits.shape == (33, config.num_experts)
    torch.testing.assert_close(y.reshape(33, -1), per_expert_reference(moe, x.reshape(33, -1)), atol=1e-5, rtol=1e-4)
    # gradients reach the experts and the router through the grouped path
    moe(x)[0].sum().backward()
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0 and moe.gate.weight.grad.abs().sum() > 0


def test_router_losses():
    n, e, k = 64, 8, 2
    uniform = torch.zeros(n, e)
    assert load_balancing_loss([uniform], k).item() == pytest.approx(1.0)  # ties: top-k picks some, P uniform
    skewed = torch.zeros(n, e)
    skewed[:, 0] = 10.0
    assert load_balancing_loss([skewed], k).item() > 1.5
    logits = torch.randn(n, e)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert router_z_loss([logits]).item() == pytest.approx(z.item(), rel=1e-5)
    valid = torch.tensor([True] * 32 + [False] * 32)
    assert router_z_loss([logits], valid).item() == pytest.approx(torch.logsumexp(logits[:32], -1).pow(2).mean().item(), rel=1e-5)
    # the training signal: the model's own router logits give finite, differentiable losses
    model = Transformer(get_config("tiny-moe"))
    out = model(torch.randint(0, 1024, (2, 8)))
    loss = load_balancing_loss(out.router_logits, 2) + router_z_loss(out.router_logits)
    loss.backward()
    assert model.layers[1].mlp.gate.weight.grad is not None


def test_yarn_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 16.0, "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0}
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, **scaling})
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    freq, factor = yarn_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(freq, ref_freq)
    assert factor == pytest.approx(ref_factor) == pytest.approx(0.1 * math.log(16) + 1)


def test_yarn_applies_only_to_full_attention_layers():
    scaling = {"factor": 8.0, "original_max_position_embeddings": 32}
    base = get_config("tiny-moe")
    plain, scaled = Transformer(base), Transformer(base.replace(rope_scaling=scaling))
    sliding_plain = RotaryEmbedding(base.head_dim, base.rope_theta_sliding)
    assert torch.equal(scaled.rotary["sliding_attention"].inv_freq, sliding_plain.inv_freq)
    assert scaled.rotary["sliding_attention"].attention_factor == 1.0
    assert not torch.equal(scaled.rotary["full_attention"].inv_freq, plain.rotary["full_attention"].inv_freq)
    assert scaled.rotary["full_attention"].attention_factor > 1.0
    # End to end: a model whose layers are all sliding is unchanged by YaRN; one with a full layer is not.
    all_sliding = base.replace(layer_types=("sliding_attention",) * 4)
    ids = torch.randint(0, 1024, (1, 40))
    torch.manual_seed(0)
    a = Transformer(all_sliding)
    b = Transformer(all_sliding.replace(rope_scaling=scaling))
    b.load_state_dict(a.state_dict())
    torch.manual_seed(0)
    c = Transformer(base)
    d = Transformer(base.replace(rope_scaling=scaling))
    d.load_state_dict(c.state_dict())
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.allclose(c(ids).logits, d(ids).logits, atol=1e-4)


def test_grouped_linear_handles_empty_and_uneven_groups():
    from mellum.model.moe import grouped_linear

    torch.manual_seed(1)
    w = torch.randn(4, 6, 5)  # [E, Out, In]
    counts = torch.tensor([0, 3, 0, 2])
    x = torch.randn(5, 5)
    expected = torch.cat([x[:3] @ w[1].T, x[3:] @ w[3].T])
    torch.testing.assert_close(grouped_linear(x, w, counts), expected)
