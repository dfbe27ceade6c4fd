"""Direct preference optimisation: the sigmoid DPO loss against a frozen reference model, on (prompt, chosen,
rejected) pairs from a JSONL file or the serving telemetry's export (`mellum data preferences`).

DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): with implicit rewards r(y) = β·(log π(y|x) − log π_ref(y|x)),
    loss = −log σ(r(chosen) − r(rejected)),
so equal chosen and rejected give log 2. Mellum (REFERENCE.md §1) applies it to pairs of completions from real
editor feedback (accepted vs rejected/edited). Reference log-probs are computed once before training (the
reference is then freed) or on the fly with the reference kept in memory. Legend: B pairs, T time, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mellum.train.losses import IGNORE
from mellum.train.records import read_jsonl
from mellum.train.sft import (FinetuneConfig, Finetuner, batch_indices, data_fingerprint, seed_everything,
                              token_logprobs, weights_fingerprint)


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # strength of the KL anchor to the reference (the paper's default range 0.1–0.5)
    precompute_reference: bool = True  # reference log-probs once before training (then the reference is freed)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # response ids, ending with the end-of-text token
    rejected: list[int]


# ---- data -----------------------------------------------------------------------------------------------------
def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Preference pairs from JSONL: every line needs string fields "prompt", "chosen" and "rejected"
    (extra fields of the telemetry export are kept). Pairs whose chosen equals rejected carry no signal: dropped."""
    pairs = []
    for where, _, record in read_jsonl(path, "no preference pairs (export them with `mellum data preferences`)"):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{where}: a preference pair needs string fields {', '.join(missing)}")
        if record["chosen"] != record["rejected"]:
            pairs.append(record)
    if not pairs:
        raise ValueError(f"{path} holds no usable preference pairs")
    return pairs


def encode_pairs(tokenizer, pairs: Sequence[dict], max_len: int = 1024) -> list[EncodedPair]:
    """Prompts are rendered prompts (control tokens allowed); responses are code plus end-of-text.
    A prompt too long for `max_len` with its longer response keeps its end (the text nearest the cursor)."""
    out = []
    for pair in pairs:
        prompt = tokenizer.encode(pair["prompt"], allow_special=True) or [tokenizer.eos_id]  # never empty
        chosen = tokenizer.encode(pair["chosen"]) + [tokenizer.eos_id]
        rejected = tokenizer.encode(pair["rejected"]) + [tokenizer.eos_id]
        room = max_len - max(len(chosen), len(rejected))
        if room < 1:
            chosen, rejected = chosen[: max_len // 2], rejected[: max_len // 2]
            room = max_len - max(len(chosen), len(rejected))
        out.append(EncodedPair(prompt[-room:], chosen, rejected))
    return out


def response_batch(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int):
    """input_ids [B, T] and targets [B, T] where only response tokens are predicted."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses)) - 1
    inputs = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(prompts), width), IGNORE, dtype=torch.long)  # [B, T]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor(p + r, dtype=torch.long)
        n = len(ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, len(p) - 1:n] = ids[len(p):]
    return inputs, targets


def sequence_logps(model, prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """Summed log π(response | prompt) per row [B]."""
    device = next(model.parameters()).device
    inputs, targets = response_batch(prompts, responses, pad_id)
    inputs, targets = inputs.to(device), targets.to(device)
    logits = model(inputs).logits  # [B, T, V]
    return token_logprobs(logits, targets).sum(-1)  # [B]


def pair_logps(model, pairs: Sequence[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(chosen), log π(rejected)) [B] each, in one forward over the 2B sequences."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    logps = sequence_logps(model, prompts, responses, pad_id)
    return logps[: len(pairs)], logps[len(pairs):]


# ---- the loss -------------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss [B] and the implicit rewards of chosen and rejected [B] (detached)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # [B]
    rejected_reward = beta * (policy_rejected - ref_rejected)  # [B]
    loss = -F.logsigmoid(chosen_reward - rejected_reward)  # [B]
    return loss, chosen_reward.detach(), rejected_reward.detach()


@torch.no_grad()
def reference_logps(model, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """Reference log-probs [N, 2] (chosen, rejected) of every pair, computed once."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[i:i + batch_size], pad_id)
        out.append(torch.stack([c, r], dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate_pairs(model, pairs: Sequence[EncodedPair], ref: torch.Tensor, beta: float, pad_id: int,
                   batch_size: int = 8) -> dict:
    """Mean DPO loss, reward margin (r_chosen − r_rejected), accuracy (margin > 0) and the policy's raw
    log-prob margin log π(chosen) − log π(rejected), over pairs with reference log-probs `ref` [N, 2]."""
    was_training = model.training
    model.eval()
    losses, margins, raw = [], [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[i:i + batch_size], pad_id)
        rc, rr = ref[i:i + batch_size, 0].to(c.device), ref[i:i + batch_size, 1].to(c.device)
        loss, cr, rj = dpo_loss(c, r, rc, rr, beta)
        losses.append(loss.cpu())
        margins.append((cr - rj).cpu())
        raw.append((c - r).cpu())
    model.train(was_training)
    losses, margins, raw = torch.cat(losses), torch.cat(margins), torch.cat(raw)
    return {"loss": losses.mean().item(), "reward_margin": margins.mean().item(),
            "accuracy": (margins > 0).float().mean().item(), "logp_margin": raw.mean().item()}


# ---- the DPO stage ---------------------------------------------------------------------------------------------
def train_dpo(policy, tokenizer, train_pairs: Sequence[dict], heldout_pairs: Sequence[dict], config: FinetuneConfig,
              dpo: DPOConfig = DPOConfig(), reference=None, out_dir: str | os.PathLike | None = None,
              bar: bool = True, resume: bool = False) -> dict:
    """Optimise `policy` in place with DPO. `reference` defaults to a frozen copy of the starting policy.

    Reports, before and after, the held-out reward margin and accuracy (and the policy's raw log-prob margin).
    """
    import copy

    if not train_pairs:
        raise ValueError("no DPO training pairs")
    seed_everything(config.seed)
    device = torch.device(config.device)
    policy.to(device)
    pad = tokenizer.eos_id
    train = encode_pairs(tokenizer, train_pairs, config.max_len)
    heldout = encode_pairs(tokenizer, heldout_pairs, config.max_len) if heldout_pairs else []
    if reference is None:
        reference = copy.deepcopy(policy)
    reference.to(device).eval().requires_grad_(False)
    reference_id = weights_fingerprint(reference)  # another reference changes the loss: a resume must keep it
    ref_train = ref_heldout = None
    if dpo.precompute_reference:
        ref_train = reference_logps(reference, train, pad, config.micro_batch)
        ref_heldout = reference_logps(reference, heldout, pad, config.micro_batch) if heldout else None
        reference = None  # precomputed: the reference's weights are no longer needed
    elif heldout:
        ref_heldout = reference_logps(reference, heldout, pad, config.micro_batch)

    # Held-out metrics of the starting policy, before a resumed run restores its checkpoint.
    before = evaluate_pairs(policy, heldout, ref_heldout, dpo.beta, pad, config.micro_batch) if heldout else None
    tuner = Finetuner(policy, config, out_dir, "dpo", bar=bar, resume=resume,
                      settings={"beta": dpo.beta, "reference": reference_id, "train_data": data_fingerprint(
                          [(p.prompt, p.chosen, p.rejected) for p in train])})
    if before is not None and tuner.step_count == 0:
        tuner.log(**{f"eval_{k}": v for k, v in before.items()})

    def loss_fn(chunk):
        idx = chunk["indices"]
        items = [train[i] for i in idx]
        c, r = pair_logps(policy, items, pad)
        if ref_train is not None:
            rc, rr = ref_train[idx, 0].to(device), ref_train[idx, 1].to(device)
        else:
            with torch.no_grad():
                rc, rr = pair_logps(reference, items, pad)
        loss, cr, rj = dpo_loss(c, r, rc, rr, dpo.beta)
        share = len(idx) / chunk["total"]
        margin = cr - rj
        return loss.mean() * share, {"loss": loss.mean().item() * share, "reward_margin": margin.mean().item() * share,
                                     "accuracy": (margin > 0).float().mean().item() * share,
                                     "chosen_reward": cr.mean().item() * share, "rejected_reward": rj.mean().item() * share}

    start = tuner.step_count
    try:
        while tuner.step_count < config.max_steps:
            idx = batch_indices(len(train), config.batch_size, tuner.step_count, config.seed)
            chunks = [{"indices": idx[i:i + config.micro_batch], "total": len(idx)}
                      for i in range(0, len(idx), config.micro_batch)]
            tuner.step(loss_fn, chunks)
            if heldout and config.eval_every and tuner.step_count % config.eval_every == 0 \
                    and tuner.step_count < config.max_steps:
                tuner.log(**{f"eval_{k}": v for k, v in
                             evaluate_pairs(policy, heldout, ref_heldout, dpo.beta, pad, config.micro_batch).items()})
        after = evaluate_pairs(policy, heldout, ref_heldout, dpo.beta, pad, config.micro_batch) if heldout else None
        if after is not None and tuner.step_count != start:  # a finished run resumed has logged it
            tuner.log(**{f"eval_{k}": v for k, v in after.items()})
        tuner.save()
    finally:
        tuner.close()
    return {"steps": tuner.step_count, "train_pairs": len(train), "heldout_pairs": len(heldout),
            "heldout_before": before, "heldout_after": after}
