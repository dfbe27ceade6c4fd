"""Reinforcement learning with verifiable rewards: GRPO with group-normalised advantages, the clipped objective,
per-token IcePop truncation of the trainer/inference mismatch, soft overlong and concision penalties.

- GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300 §4.1): sample G completions per prompt; the advantage of
  completion i is (r_i − mean(r)) / (std(r) + ε) within its group, given to each of its tokens; no value model.
- Clipped surrogate (PPO; asymmetric "clip-higher" bounds and the token-level mean of DAPO, arXiv:2503.14476):
  per token ρ = π_θ / π_old, objective min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A).
- IcePop (Ling team, "Every Step Evolves", arXiv:2510.18855; Mellum 2 report): the inference engine and the trainer
  compute different probabilities for the same token (kernels, precision, quantization, stale weights); tokens whose
  ratio π_old(trainer) / π_infer(engine) leaves [1/k, k] are masked out of the gradient.
- Rewards: unit tests run in the sandbox (`mellum.train.rewards`), plus DAPO's soft overlong penalty and a
  concision penalty. Rollouts can be produced asynchronously from one-update-old weights (`mellum.train.rollout`).
Legend: B sequences, T time, G group size.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mellum.train.rewards import RewardConfig, RewardShaping, UnitTestReward, UnitTestTask, shaped_rewards
from mellum.train.rollout import AsyncRollouts, Rollout, RolloutWorker, SamplingConfig
from mellum.train.sft import FinetuneConfig, Finetuner, seed_everything, token_logprobs


@dataclass(frozen=True)
class GRPOConfig:
    clip_low: float = 0.2  # ε_low
    clip_high: float = 0.28  # ε_high (DAPO clip-higher)
    icepop_k: float = 2.0  # keep tokens whose π_old/π_infer lies in [1/k, k]
    scale_by_std: bool = True  # GRPO's division by the group's reward std (off: Dr. GRPO, arXiv:2503.20783)
    epsilon: float = 1e-6
    updates_per_batch: int = 1  # gradient steps on one rollout batch (> 1: the clip starts to bind)
    max_staleness: int = 1  # 0: synchronous; 1: rollouts of batch n+1 overlap the update on batch n
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    shaping: RewardShaping = field(default_factory=RewardShaping)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        if self.icepop_k < 1:
            raise ValueError(f"icepop_k must be >= 1 (the kept band is [1/k, k]), got {self.icepop_k}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("clip bounds must satisfy 0 <= clip_low < 1 and clip_high >= 0")
        # DAPO's L_max is the generation limit: with another value the soft overlong penalty would hit completions
        # that were never near the limit (shaping 64, sampling 256: every answer past 48 tokens loses up to 1).
        if self.shaping.max_new_tokens != self.sampling.max_new_tokens:
            raise ValueError(f"shaping.max_new_tokens ({self.shaping.max_new_tokens}) must equal "
                             f"sampling.max_new_tokens ({self.sampling.max_new_tokens}): the overlong penalty's L_max "
                             "is the generation limit")
        if not 0 <= self.shaping.overlong_buffer <= self.shaping.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [0, max_new_tokens], got {self.shaping.overlong_buffer}")


# ---- the math, as pure functions ------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, epsilon: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] → advantages [N, G]: centred on the group mean, divided by the group std (population).

    A group whose rewards are all equal carries no signal: its advantages are exactly 0. (Computed naively, the
    mean of G equal values like 0.3 is off by an ulp, and that ulp divided by std + ε ≈ ε came out as ±0.03–0.1
    on every token of the group.)"""
    constant = rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True)  # [N, 1]
    centred = (rewards - rewards.mean(dim=-1, keepdim=True)).masked_fill(constant, 0.0)  # [N, G]
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=-1, unbiased=False, keepdim=True) + epsilon)


def icepop_mask(trainer_logps: torch.Tensor, infer_logps: torch.Tensor, k: float) -> torch.Tensor:
    """True where the token is kept: π_trainer / π_infer ∈ [1/k, k]. Both [B, T] log-probs."""
    log_ratio = trainer_logps - infer_logps
    bound = math.log(k)
    return (log_ratio >= -bound) & (log_ratio <= bound)


def clipped_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token surrogate min(ρA, clip(ρ)A) [B, T] and whether the clip was active [B, T].
    `advantages` broadcasts ([B, 1] per sequence)."""
    ratio = torch.exp(logps - old_logps)  # [B, T]
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    return objective, (clipped < unclipped)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, infer_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, config: GRPOConfig, num_tokens: float) -> tuple[torch.Tensor, dict]:
    """−Σ (kept tokens) surrogate / num_tokens, with IcePop dropping mismatched tokens; `mask` [B, T] marks the
    completion tokens; `num_tokens` is the completion-token count of the whole step (DAPO's token-level mean)."""
    kept = icepop_mask(old_logps, infer_logps, config.icepop_k) & mask  # [B, T]
    objective, clip_active = clipped_objective(logps, old_logps, advantages, config.clip_low, config.clip_high)
    loss = -(objective * kept).sum() / num_tokens
    n = mask.sum().clamp(min=1)
    stats = {"icepop_masked": float(((~kept) & mask).sum()), "clip_fraction": float((clip_active & kept).sum() / n),
             "tokens": float(mask.sum())}
    return loss, stats


_EVAL_CALL = 1 << 30  # sampling-seed stream of evaluation rollouts (training batches use 0, 1, 2, ...)


# ---- the trainer ------------------------------------------------------------------------------------------------
def _sequence_batch(rollouts: Sequence[Rollout], pad_id: int, device):
    """Inputs [B, T], targets [B, T] (completion tokens only), and the inference log-probs aligned with targets."""
    from mellum.train.dpo import response_batch

    inputs, targets = response_batch([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id)
    infer = torch.zeros(targets.shape, dtype=torch.float32)  # [B, T]
    for b, r in enumerate(rollouts):
        start = len(r.prompt_ids) - 1
        infer[b, start:start + len(r.completion_ids)] = r.infer_logps
    return inputs.to(device), targets.to(device), infer.to(device)


def rollout_advantages(groups: Sequence[Sequence[Rollout]], config: GRPOConfig) -> tuple[list[list[float]], torch.Tensor]:
    """Shaped rewards [N][G] and advantages [N, G] of a batch of groups."""
    shaped = []
    for group in groups:
        rewards = [r.verdict.reward for r in group]
        lengths = [len(r.completion_ids) for r in group]
        shaped.append(shaped_rewards(rewards, lengths, [r.truncated for r in group], config.shaping))
    return shaped, group_advantages(torch.tensor(shaped, dtype=torch.float32), config.scale_by_std, config.epsilon)


def grpo_update(tuner: Finetuner, policy, groups: Sequence[Sequence[Rollout]], config: GRPOConfig,
                pad_id: int, micro_batch: int) -> dict:
    """One or more optimizer steps on a batch of verified groups; returns the last step's metrics."""
    device = next(policy.parameters()).device
    shaped, adv = rollout_advantages(groups, config)
    rollouts = [r for g in groups for r in g if r.completion_ids]
    seq_adv = [float(a) for g, row in zip(groups, adv) for r, a in zip(g, row) if r.completion_ids]
    chunks = []
    for i in range(0, len(rollouts), micro_batch):
        part = rollouts[i:i + micro_batch]
        inputs, targets, infer = _sequence_batch(part, pad_id, device)
        with torch.no_grad():  # π_old: the trainer's log-probs before this batch's updates
            old = token_logprobs(policy(inputs).logits, targets, config.sampling.temperature)
        a = torch.tensor(seq_adv[i:i + micro_batch], device=device)[:, None]  # [B, 1]
        chunks.append({"inputs": inputs, "targets": targets, "infer": infer, "old": old, "adv": a})
    num_tokens = max(1.0, float(sum((c["targets"] >= 0).sum() for c in chunks)))

    def loss_fn(c):
        logps = token_logprobs(policy(c["inputs"]).logits, c["targets"], config.sampling.temperature)
        mask = c["targets"] >= 0
        loss, stats = grpo_loss(logps, c["old"], c["infer"], c["adv"], mask, config, num_tokens)
        share = stats["tokens"] / num_tokens
        return loss, {"loss": loss.item(), "icepop_masked": stats["icepop_masked"],
                      "clip_fraction": stats["clip_fraction"] * share}

    record = {}
    for _ in range(config.updates_per_batch):
        if chunks:
            record = tuner.step(loss_fn, chunks)
        else:  # nothing was generated (cannot happen with max_new_tokens >= 1): the step passes
            tuner.step_count += 1
    record["shaped_reward"] = float(np.mean(shaped))
    record["solved_groups"] = sum(all(r.verdict.reward > 0 for r in g) for g in groups)
    record["zero_signal_groups"] = int((adv.abs().sum(-1) == 0).sum())
    return record


def train_grpo(policy, tokenizer, tasks: Sequence[UnitTestTask], config: FinetuneConfig, grpo: GRPOConfig = GRPOConfig(),
               prompt_format: str = "mellum", out_dir: str | os.PathLike | None = None, bar: bool = True,
               eval_tasks: Sequence[UnitTestTask] | None = None) -> dict:
    """Optimise `policy` in place: `config.max_steps` rollout batches of `prompts_per_step` tasks × `group_size`
    samples, each followed by `updates_per_batch` optimizer steps.

    Returns the mean verified reward of every step's rollouts, and (when `eval_tasks` are given) the mean reward of
    `group_size` samples per evaluation task before and after training.
    """
    if not tasks:
        raise ValueError("no RL tasks")
    seed_everything(config.seed)
    device = torch.device(config.device)
    policy.to(device)
    samp = grpo.sampling
    reward = UnitTestReward(grpo.reward)
    worker = RolloutWorker(policy, tokenizer, reward, samp, prompt_format, seed=config.seed)
    order_rng = np.random.default_rng(config.seed)
    schedule = [order_rng.permutation(len(tasks)) for _ in range(
        (config.max_steps * samp.prompts_per_step) // len(tasks) + 2)]
    flat = np.concatenate(schedule)

    def next_tasks(n: int) -> list[UnitTestTask]:
        return [tasks[int(i)] for i in flat[n * samp.prompts_per_step:(n + 1) * samp.prompts_per_step]]

    def evaluate(call: int) -> float | None:
        if not eval_tasks:
            return None
        batch = worker.generate(list(eval_tasks), call=call)
        return batch.stats["reward"]

    config = dataclasses.replace(config, max_steps=config.max_steps * grpo.updates_per_batch)  # optimizer steps
    batches = config.max_steps // grpo.updates_per_batch
    tuner = Finetuner(policy, config, out_dir, "grpo", bar=bar)
    before = evaluate(_EVAL_CALL)
    if before is not None:
        tuner.log(eval_reward=before)
    producer = AsyncRollouts(worker, next_tasks, grpo.max_staleness, total=batches)
    rewards, staleness, statuses = [], [], {}
    try:
        for trained in range(batches):
            batch = producer.get(timeout=600)
            staleness.append(trained - batch.version)  # versions count the batches trained on
            for k, v in batch.stats["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
            update = grpo_update(tuner, policy, batch.groups, grpo, tokenizer.eos_id, config.micro_batch)
            rewards.append(batch.stats["reward"])
            tuner.log(reward=batch.stats["reward"], staleness=staleness[-1],
                      **{k: update[k] for k in ("shaped_reward", "solved_groups", "zero_signal_groups")},
                      **{f"status_{k}": v for k, v in batch.stats["statuses"].items()})
            producer.updated(policy, trained + 1)
        producer.close()
        after = evaluate(_EVAL_CALL)  # the same seeds as before: a paired comparison
        if after is not None:
            tuner.log(eval_reward=after)
        tuner.save()
    finally:
        producer.close()
        worker.close()
        reward.close()
        tuner.close()
    return {"steps": tuner.step_count, "batches": batches, "rewards": rewards, "max_staleness_seen": max(staleness, default=0),
            "statuses": statuses, "sandbox_runs": reward.executions, "eval_reward_before": before,
            "eval_reward_after": after}
