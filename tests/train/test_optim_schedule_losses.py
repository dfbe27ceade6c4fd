"""Optimizer split and Muon updates, the WSD schedule and batch ramp, and the pre-training losses."""

from __future__ import annotations

import math

import pytest
import torch

from mellum.config import get_config
from mellum.model import Transformer
from mellum.train.losses import (
    IGNORE, LossWeights, load_balancing_loss, mtp_inputs_and_targets, pretraining_loss, router_z_loss,
)
from mellum.train.optim import (
    NewtonSchulzMuon, OptimConfig, build_optimizers, moonlight_scale, split_parameters, zeropower_newton_schulz,
)
from mellum.train.schedule import BatchRamp, Progress, WSDSchedule


# ---- Muon -----------------------------------------------------------------------------------------------
def test_newton_schulz_orthogonalises_and_update_rms_matches_adamw():
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (4, 32, 96)]:
        g = torch.randn(*shape)
        o = zeropower_newton_schulz(g, steps=5)
        assert o.shape == g.shape
        # Singular values land near 1 (the quintic iteration leaves them in roughly [0.6, 1.2]).
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
        # Moonlight scaling: RMS of the applied update ≈ 0.2 (AdamW's typical update RMS).
        a, b = shape[-2:]
        rms = (o * moonlight_scale(o.shape)).pow(2).mean().sqrt().item()
        expected = 0.2 * math.sqrt(max(a, b)) * math.sqrt(min(a, b) / (a * b))  # ‖O‖_F = sqrt(min(A,B)) for S = 1
        assert rms == pytest.approx(0.2, rel=0.25) and rms == pytest.approx(expected, rel=0.25)


def test_own_muon_matches_torch_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    torch.manual_seed(1)
    w0 = torch.randn(48, 80)
    p1, p2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = NewtonSchulzMuon([p1], lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon([p2], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(48, 80)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    # torch runs Newton–Schulz in bf16; ours in fp32 on CPU: equal to bf16 precision of the small update.
    torch.testing.assert_close(p1, p2, atol=3e-3, rtol=0)
    assert not torch.equal(p1.detach(), w0)


def test_only_hidden_matrices_use_muon():
    model = Transformer(get_config("tiny-moe"))
    groups = split_parameters(model, OptimConfig())
    muon = {n for n, _ in groups["muon"]} | {n for n, _ in groups["muon_stacked"]}
    adamw = {n for n, _ in groups["adamw_decay"]} | {n for n, _ in groups["adamw_no_decay"]}
    assert muon and not (muon & adamw)
    assert all(p.ndim in (2, 3) for _, p in groups["muon"] + groups["muon_stacked"])
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert name in adamw
    assert any("gate" in n for n in adamw)  # the MoE router
    assert all("norm" not in n for n in muon)
    assert any("q_proj" in n for n in muon) and any("down_proj" in n for n in muon)
    assert any(p.ndim == 3 for _, p in groups["muon_stacked"])  # stacked experts [E, A, B]
    n_params = sum(1 for p in model.parameters())
    assert len(muon) + len(adamw) == n_params
    opts = build_optimizers(model, OptimConfig())
    kinds = {type(o).__name__ for o in opts}
    assert kinds == {"AdamW", "NewtonSchulzMuon"}  # on CPU our fp32 Muon (torch's iterates in bf16)
    adamw_only = build_optimizers(model, OptimConfig(muon=False))
    assert [type(o).__name__ for o in adamw_only] == ["AdamW"]


# ---- schedule -------------------------------------------------------------------------------------------
def test_wsd_shape():
    s = WSDSchedule(warmup_steps=10, decay_fraction=0.2)
    total = 100
    f = [s.factor(i, i / total) for i in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5)
    assert all(x == 1.0 for x in f[9:81])  # hold at the peak
    assert all(a > b for a, b in zip(f[81:], f[82:]))  # strictly decreasing while decaying
    assert f[90] == pytest.approx(0.5) and f[100] == pytest.approx(0.0)
    cos = WSDSchedule(warmup_steps=0, decay_fraction=0.5, decay_shape="cosine", final_factor=0.1)
    assert cos.factor(0, 0.75) == pytest.approx(0.55) and cos.factor(0, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        WSDSchedule(decay_fraction=1.5)


def test_batch_ramp_and_progress():
    ramp = BatchRamp(((0, 4), (1000, 8)))
    assert ramp.batch_size(999) == 4 and ramp.batch_size(1000) == 8
    assert ramp.accumulation_steps(0, micro_batch=2, world_size=1) == 2
    assert ramp.accumulation_steps(5000, micro_batch=2, world_size=2) == 2
    with pytest.raises(ValueError, match="multiple"):
        ramp.accumulation_steps(0, micro_batch=3, world_size=1)
    p = Progress(max_steps=100, max_seconds=60.0, step=10, seconds=30.0)
    assert p.fraction() == pytest.approx(0.5) and not p.done()
    p.seconds = 61.0
    assert p.done()


# ---- losses ---------------------------------------------------------------------------------------------
def test_load_balancing_and_z_loss_hand_computed():
    # Two tokens, three experts, top-1. Logits chosen so softmax is easy: ln(probs).
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])
    logits = probs.log()
    # f = (1/2, 1/2, 0) (token 0 → expert 0, token 1 → expert 1); P = (0.35, 0.425, 0.225)
    # loss = E · Σ f_i P_i = 3 · (0.175 + 0.2125) = 1.1625
    assert load_balancing_loss([logits], top_k=1).item() == pytest.approx(1.1625)
    # z-loss: logsumexp(ln p) = ln Σ p = 0 → 0; shift token 1 by +1 → lse = 1 → mean (0 + 1)/2 = 0.5
    shifted = logits.clone()
    shifted[1] += 1.0
    assert router_z_loss([logits]).item() == pytest.approx(0.0, abs=1e-6)
    assert router_z_loss([shifted]).item() == pytest.approx(0.5)
    # Perfectly uniform routing gives the minimum (1 in this normalisation); averaging over layers.
    uniform = torch.zeros(6, 3)
    assert load_balancing_loss([uniform, logits], top_k=1).item() == pytest.approx((1.0 + 1.1625) / 2, rel=1e-5)


def test_mtp_targets():
    targets = torch.tensor([[11, 12, IGNORE, 21, 22, 23]])  # doc 0: x=10,11,12 ; doc 1: x=20..23 (+ one more)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    next_ids, mtp = mtp_inputs_and_targets(targets, doc_ids)
    assert next_ids.tolist() == [[11, 12, 0, 21, 22, 23]]
    # t=0: given x1=11, predict x2=12; t=1: x3 is in the next document → ignored; t=2: no target; t=3,4: 22, 23.
    assert mtp.tolist() == [[12, IGNORE, IGNORE, 22, 23, IGNORE]]


def test_pretraining_loss_accumulates_to_global_mean():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-moe"))
    weights = LossWeights.from_config(model.config.replace(router_z_loss_coef=1e-3))
    assert weights.router_aux > 0 and weights.router_z > 0 and weights.mtp > 0
    ids = torch.randint(0, 1024, (2, 17))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].clone(),
             "positions": torch.arange(16).expand(2, 16), "doc_ids": torch.zeros(2, 16, dtype=torch.long)}
    batch["targets"][0, 3] = IGNORE
    n = (batch["targets"] != IGNORE).sum().item()
    total, parts = pretraining_loss(model, batch, weights, num_targets=n)
    ce = parts["ce_sum"] / n
    assert 6.0 < ce.item() < 7.5  # ≈ ln(1024) at initialisation
    assert {"router_aux", "router_z", "mtp_sum"} <= parts.keys()
    expected = ce + weights.router_aux * parts["router_aux"] + weights.router_z * parts["router_z"] \
        + weights.mtp * parts["mtp_sum"] / n
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    # Split into two micro-batches: the summed losses equal the whole-batch token terms.
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    ce_split = sum(pretraining_loss(model, h, LossWeights(), num_targets=n)[0] for h in halves)
    assert ce_split.item() == pytest.approx(ce.item(), rel=1e-5)
