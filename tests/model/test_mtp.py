"""The MTP layer: inputs, the t+2 loss that respects document boundaries, and cached drafting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mellum.config import get_config
from mellum.model import DenseKVCache, Transformer, mtp_loss, next_token_ids


def test_next_token_ids_shift():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert next_token_ids(ids, pad_id=0).tolist() == [[6, 7, 8, 0]]


def test_mtp_loss_targets_are_t_plus_2_within_documents():
    v = 10
    logits = torch.randn(1, 7, v)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    # valid t: t, t+1, t+2 in one document -> t=0 (0,1,2), t=3 (3,4,5), t=4 (4,5,6); t=1, t=2 cross the boundary
    expected = F.cross_entropy(logits[0, [0, 3, 4]], torch.tensor([3, 6, 7]))
    torch.testing.assert_close(mtp_loss(logits, ids, doc), expected)
    no_docs = F.cross_entropy(logits[0, :5], ids[0, 2:])
    torch.testing.assert_close(mtp_loss(logits, ids), no_docs)
    labels = ids.clone()
    labels[0, 2] = -100  # e.g. a prompt token in SFT
    torch.testing.assert_close(mtp_loss(logits, ids, doc, labels=labels),
                               F.cross_entropy(logits[0, [3, 4]], torch.tensor([6, 7])))


def test_mtp_loss_of_packed_sequence_equals_separate_documents():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-moe")).eval()
    a, b = torch.randint(0, 1024, (1, 12)), torch.randint(0, 1024, (1, 9))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 12 + [1] * 9])
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None]

    def loss_sum(ids, positions=None, doc_ids=None):
        out = model(ids, positions=positions, doc_ids=doc_ids)
        logits = model.mtp(out.hidden, next_token_ids(ids), positions=positions, doc_ids=doc_ids)
        return mtp_loss(logits, ids, doc_ids)

    with torch.no_grad():
        packed_loss = loss_sum(packed, pos, doc)
        separate = (loss_sum(a) * 10 + loss_sum(b) * 7) / 17  # 10 and 7 valid positions
    torch.testing.assert_close(packed_loss, separate, atol=1e-5, rtol=1e-4)


def test_mtp_trains_and_drafts_with_cache():
    torch.manual_seed(1)
    model = Transformer(get_config("tiny-moe"))
    ids = torch.randint(0, 1024, (2, 24))
    out = model(ids)
    logits, router = model.mtp(out.hidden, next_token_ids(ids), return_router_logits=True)
    assert len(router) == 1 and router[0].shape == (48, 8)
    mtp_loss(logits, ids).backward()
    assert model.mtp.fc.weight.grad.abs().sum() > 0 and model.embed_tokens.weight.grad is not None
    # Drafting: the MTP layer's KV lives in the cache at layer index num_layers; cached == uncached.
    model.eval()
    with torch.no_grad():
        full = model.mtp(out.hidden.detach(), next_token_ids(ids))
        cache = DenseKVCache(model.config, 2, 32)
        h = model(ids, cache=cache).hidden
        first = model.mtp(h[:, :20], next_token_ids(ids)[:, :20], cache=cache)
        rest = model.mtp(h[:, 20:], next_token_ids(ids)[:, 20:], positions=torch.arange(20, 24).expand(2, 4), cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-4)
    assert (cache.k_pos[model.config.num_layers] >= 0).sum() == 2 * 24
