"""Attention masks and the KV-cache path against brute-force references."""

from __future__ import annotations

import math

import torch

from mellum.config import get_config
from mellum.model import DenseKVCache, Transformer, attention_mask
from mellum.model.attention import Attention
from mellum.model.rotary import RotaryEmbedding


def brute_force_attention(q, k, v, window):
    """Loop over query/key pairs: causal, within `window`, softmax by hand. q [B,H,T,D], k/v [B,Hkv,T,D]."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(t) if j <= i and (window is None or i - j < window)]
                scores = torch.stack([q[bi, hi, i] @ k[bi, hi // group, j] / math.sqrt(d) for j in keys])
                weights = torch.softmax(scores, dim=0)
                out[bi, hi, i] = sum(w * v[bi, hi // group, j] for w, j in zip(weights, keys))
    return out


def test_attention_mask_semantics():
    q = torch.tensor([[5, 6]])
    k = torch.tensor([[-1, 2, 3, 4, 5, 6, 7]])
    m = attention_mask(q, k, window=3)[0, 0]
    assert m.tolist() == [
        [False, False, True, True, True, False, False],  # q=5 sees 3, 4, 5 (5 - k < 3); the empty slot never
        [False, False, False, True, True, True, False],
    ]
    full = attention_mask(q, k)[0, 0]
    assert full[0].tolist() == [False, True, True, True, True, False, False]
    docs = attention_mask(q, k[:, 1:], q_doc=torch.tensor([[1, 2]]), k_doc=torch.tensor([[1, 1, 1, 1, 2, 2]]))[0, 0]
    assert docs.tolist() == [[True, True, True, True, False, False], [False, False, False, False, True, False]]


def test_sliding_window_attention_matches_brute_force():
    config = get_config("tiny-moe").replace(sliding_window=5)
    torch.manual_seed(0)
    attn = Attention(config, layer_idx=0)  # a sliding layer
    assert attn.window == 5
    x = torch.randn(2, 13, config.hidden_size)
    positions = torch.arange(13).expand(2, 13)
    rope = RotaryEmbedding(config.head_dim, config.rope_theta_sliding)(positions, x.dtype)
    mask = attention_mask(positions, positions, attn.window)
    got = attn(x, rope, positions, mask)
    # Recompute q, k, v exactly as the module does, then attend by brute force.
    from mellum.model.rotary import apply_rotary

    q = attn.q_norm(attn.q_proj(x).view(2, 13, 4, 16))
    k = attn.k_norm(attn.k_proj(x).view(2, 13, 2, 16))
    v = attn.v_proj(x).view(2, 13, 2, 16).transpose(1, 2)
    q, k = apply_rotary(q.transpose(1, 2), *rope), apply_rotary(k.transpose(1, 2), *rope)
    ref = attn.o_proj(brute_force_attention(q, k, v, 5).transpose(1, 2).reshape(2, 13, 64))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # and the window matters: full attention gives something else
    assert not torch.allclose(got, attn(x, rope, positions, None), atol=1e-3)


def test_cached_prefill_and_decode_match_full_forward():
    for name in ("tiny-dense", "tiny-moe"):
        torch.manual_seed(1)
        model = Transformer(get_config(name)).eval()
        ids = torch.randint(0, 1024, (2, 40))
        with torch.no_grad():
            full = model(ids)
            cache = DenseKVCache(model.config, batch_size=2, max_len=64)
            pieces = [model(ids[:, :25], cache=cache).logits]
            for t in range(25, 40):  # one token at a time, past the sliding window
                pos = torch.full((2, 1), t)
                pieces.append(model(ids[:, t : t + 1], positions=pos, cache=cache).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full.logits, atol=1e-5, rtol=1e-4)
        assert torch.equal(torch.cat(pieces, 1).argmax(-1), full.logits.argmax(-1))


def test_cache_truncate_rewinds():
    torch.manual_seed(2)
    model = Transformer(get_config("tiny-moe")).eval()
    ids = torch.randint(0, 1024, (1, 30))
    with torch.no_grad():
        cache = DenseKVCache(model.config, 1, 32)
        model(ids[:, :20], cache=cache)
        model(torch.randint(0, 1024, (1, 5)), positions=torch.arange(20, 25)[None], cache=cache)  # rejected draft
        cache.truncate(20)
        got = model(ids[:, 20:], positions=torch.arange(20, 30)[None], cache=cache).logits
        torch.testing.assert_close(got, model(ids).logits[:, 20:], atol=1e-5, rtol=1e-4)


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(3)
    model = Transformer(get_config("tiny-moe")).eval()
    a, b = torch.randint(0, 1024, (1, 20)), torch.randint(0, 1024, (1, 15))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 15])
    positions = torch.cat([torch.arange(20), torch.arange(15)])[None]
    with torch.no_grad():
        got = model(packed, positions=positions, doc_ids=doc_ids).logits
        torch.testing.assert_close(got[:, :20], model(a).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[:, 20:], model(b).logits, atol=1e-5, rtol=1e-4)
