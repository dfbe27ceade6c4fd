"""GRPO: advantages, clipping, IcePop masking and penalties against hand-computed values; the sandbox stops hostile
completions while training goes on; GRPO raises the mean reward of a tiny model on a unit-tested task."""

from __future__ import annotations

import math

import pytest
import torch

from mellum.train.grpo import (GRPOConfig, clipped_objective, group_advantages, grpo_loss, grpo_update,
                               icepop_mask, train_grpo)
from mellum.train.optim import OptimConfig
from mellum.train.rewards import (RewardConfig, RewardShaping, UnitTestReward, UnitTestTask, concision_penalties,
                                  overlong_penalty, shaped_rewards)
from mellum.train.rollout import Rollout, SamplingConfig
from mellum.train.schedule import WSDSchedule
from mellum.train.sft import FinetuneConfig, Finetuner


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


# ---- the math against hand-computed values -------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards, epsilon=0.0 + 1e-12)
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])  # mean 0.5, population std 0.5
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # no signal in a group that is all wrong
    std = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 4)
    assert adv[2].tolist() == pytest.approx([2.25 / std, -0.75 / std, -0.75 / std, -0.75 / std])
    assert group_advantages(rewards, scale_by_std=False)[2].tolist() == pytest.approx([2.25, -0.75, -0.75, -0.75])
    # Equal shaped rewards that are not exact in binary (a penalty of 0.7, a concision share) are still no signal.
    equal = torch.tensor([[0.3] * 8, [0.9] * 8, [1.0 - 0.7] * 8])
    assert group_advantages(equal).abs().max().item() == 0.0
    assert group_advantages(equal, scale_by_std=False).abs().max().item() == 0.0


def test_clipped_objective_by_hand():
    ratios = torch.tensor([[0.5, 1.0, 1.5]])
    logps, old = torch.log(ratios), torch.zeros(1, 3)
    pos, clip_pos = clipped_objective(logps, old, torch.tensor([[1.0]]), clip_low=0.2, clip_high=0.28)
    # A > 0: min(ρA, clip(ρ)A) keeps ρ = 0.5 (pessimistic), caps ρ = 1.5 at 1.28.
    assert pos[0].tolist() == pytest.approx([0.5, 1.0, 1.28])
    assert clip_pos[0].tolist() == [False, False, True]
    neg, clip_neg = clipped_objective(logps, old, torch.tensor([[-1.0]]), clip_low=0.2, clip_high=0.28)
    # A < 0: ρ = 0.5 is clipped to 0.8 (−0.8), ρ = 1.5 stays (−1.5).
    assert neg[0].tolist() == pytest.approx([-0.8, -1.0, -1.5])
    assert clip_neg[0].tolist() == [True, False, False]
    # The gradient flows only through unclipped tokens.
    logps = torch.log(ratios).requires_grad_()
    obj, _ = clipped_objective(logps, old, torch.tensor([[1.0]]), 0.2, 0.28)
    obj.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([0.5, 1.0, 0.0])  # d(ρA)/dlogρ = ρA; 0 where clipped


def test_icepop_mask_by_hand():
    # π_trainer / π_infer per token; k = 2 keeps [0.5, 2].
    ratios = torch.tensor([[0.4, 0.51, 1.0, 1.99, 2.1, 10.0]])
    infer = torch.log(torch.tensor([[0.3, 0.2, 0.9, 0.1, 0.4, 0.05]]))
    trainer = infer + torch.log(ratios)
    assert icepop_mask(trainer, infer, k=2.0)[0].tolist() == [False, True, True, True, False, False]
    assert icepop_mask(trainer, infer, k=20.0).all()


def test_grpo_loss_by_hand():
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.2, icepop_k=2.0)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
    logps = old + torch.log(torch.tensor([[1.1, 1.5, 1.0], [0.9, 1.0, 1.0]]))  # ratios ρ
    infer = old - torch.log(torch.tensor([[1.0, 1.0, 3.0], [1.0, 1.0, 1.0]]))  # token (0, 2): π_old/π_infer = 3
    adv = torch.tensor([[2.0], [-1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # (1, 2) is padding
    loss, stats = grpo_loss(logps, old, infer, adv, mask, cfg, num_tokens=10.0)
    # Kept tokens: (0,0) ρ=1.1 → 2.2; (0,1) ρ=1.5 clipped to 1.2 → 2.4; (0,2) IcePop-masked;
    # (1,0) ρ=0.9 with A=−1 → min(−0.9, −0.9) = −0.9; (1,1) → −1.0. Loss = −(2.2 + 2.4 − 0.9 − 1.0) / 10.
    assert loss.item() == pytest.approx(-(2.2 + 2.4 - 0.9 - 1.0) / 10, abs=1e-6)
    assert stats["icepop_masked"] == 1.0 and stats["tokens"] == 5.0
    assert stats["clip_fraction"] == pytest.approx(1 / 5)


def test_overlong_and_concision_penalties_by_hand():
    # DAPO soft overlong: L_max 20, buffer 4 → 0 up to 16, then −1/4 per token, −1 beyond 20.
    assert [overlong_penalty(n, 20, 4) for n in (10, 16, 17, 19, 20, 21)] == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    # Concision: correct answers of lengths 10, 20, 30 lose 0, coef/2, coef; wrong answers lose nothing.
    assert concision_penalties([1, 1, 0, 1], [10, 20, 5, 30], 0.2) == pytest.approx([0.0, -0.1, 0.0, -0.2])
    assert concision_penalties([1, 0, 0], [10, 20, 30], 0.2) == [0.0, 0.0, 0.0]  # one correct: nothing to compare
    shaping = RewardShaping(max_new_tokens=20, overlong_buffer=4, concision_coef=0.2)
    shaped = shaped_rewards([1, 1, 0, 0], [10, 18, 12, 20], [False, False, False, True], shaping)
    assert shaped == pytest.approx([1.0, 1.0 - 0.2 - 0.5, 0.0, -1.0])  # the truncated one gets the full penalty
    # L_max is the generation limit: a shaping limit other than the sampling one is refused, not silently used.
    with pytest.raises(ValueError, match="max_new_tokens"):
        GRPOConfig(sampling=SamplingConfig(max_new_tokens=256))
    with pytest.raises(ValueError, match="overlong_buffer"):
        GRPOConfig(sampling=SamplingConfig(max_new_tokens=8),
                   shaping=RewardShaping(max_new_tokens=8, overlong_buffer=9))


# ---- sandboxed rewards ---------------------------------------------------------------------------------------
HOSTILE = {
    "loop": "def f():\n    while True:\n        pass\n",
    "memory": "def f():\n    return len(bytearray(10 ** 11))\n",
    "fork": "import os\ndef f():\n    os.fork()\n    return 1\n",
    "socket": "import socket\ndef f():\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return 1\n",
    "good": "def f():\n    return 1\n",
}


def test_sandbox_stops_hostile_completions_and_training_goes_on(tiny_tokenizer):
    from mellum.config import get_config
    from mellum.model import Transformer
    from mellum.train.dpo import response_batch
    from mellum.train.sft import token_logprobs

    task = UnitTestTask("f", prefix="", suffix="", test="assert f() == 1")
    reward = UnitTestReward(RewardConfig(timeout_s=4.0, memory_mb=256, workers=2))  # room for a loaded CI machine
    try:
        verdicts = dict(zip(HOSTILE, reward.score_many([(task, c) for c in HOSTILE.values()])))
    finally:
        reward.close()
    assert {k: v.reward for k, v in verdicts.items()} == {"loop": 0.0, "memory": 0.0, "fork": 0.0, "socket": 0.0,
                                                          "good": 1.0}
    assert verdicts["loop"].status == "timeout"
    assert verdicts["memory"].status == "memory"
    assert "os.fork" in verdicts["fork"].reason and "socket" in verdicts["socket"].reason

    # The verdicts feed a GRPO step like any others: the update runs and moves the weights.
    torch.manual_seed(0)
    policy = Transformer(get_config("tiny-dense"))
    prompt = tiny_tokenizer.encode("# complete f\n")
    group = []
    for name, text in HOSTILE.items():
        ids = tiny_tokenizer.encode(text) + [tiny_tokenizer.eos_id]
        inputs, targets = response_batch([prompt], [ids], tiny_tokenizer.eos_id)
        with torch.no_grad():
            logps = token_logprobs(policy(inputs).logits, targets)[0, len(prompt) - 1:]
        group.append(Rollout(task, prompt, ids, text, False, logps, verdicts[name]))
    tuner = Finetuner(policy, FinetuneConfig(max_steps=1, optim=OptimConfig(lr=1e-3, muon=False)), None, "grpo",
                      bar=False)
    before = [p.detach().clone() for p in policy.parameters()]
    record = grpo_update(tuner, policy, [group], GRPOConfig(), tiny_tokenizer.eos_id, micro_batch=8)
    assert tuner.step_count == 1 and math.isfinite(record["loss"]) and record["icepop_masked"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_a_clean_exit_before_the_tests_end_is_not_a_pass():
    """Exit status 0 is not enough: a completion that exits (sys.exit, os._exit, an exit hook) before or after a
    failing assertion scores 0; tests that flood stdout still pass when they run to their end."""
    task = UnitTestTask("inc", prefix="def inc(n):\n    return ", suffix="\n",
                        test="assert inc(1) == 2\nassert inc(5) == 6")
    flood = UnitTestTask("flood", prefix="def inc(n):\n    return ", suffix="\n",
                         test="print('x' * (3 << 20))\nassert inc(1) == 2")  # 3 MB: past the captured 1 MB
    completions = {"right": "n + 1", "wrong": "0", "sys.exit": "__import__('sys').exit(0)",
                   "os._exit": "__import__('os')._exit(0)", "raise": "0\nraise SystemExit",
                   "atexit": "0\nimport atexit, os\natexit.register(lambda: os._exit(0))"}
    reward = UnitTestReward(RewardConfig(timeout_s=4.0, workers=2))
    try:
        verdicts = reward.score_many([(task, c) for c in completions.values()] + [(flood, "n + 1")])
    finally:
        reward.close()
    got = {name: (v.reward, v.status) for name, v in zip(list(completions) + ["flood"], verdicts)}
    assert got == {"right": (1.0, "ok"), "wrong": (0.0, "error"), "sys.exit": (0.0, "exited"),
                   "os._exit": (0.0, "exited"), "raise": (0.0, "exited"), "atexit": (0.0, "exited"),
                   "flood": (1.0, "ok")}


def test_inference_logps_align_with_the_trainer_and_icepop_drops_stale_tokens(tiny_tokenizer):
    """The engine's copy scores its samples exactly as the trainer does while weights agree; once the trainer's
    weights move away (a stale rollout), IcePop masks the tokens whose probability ratio left [1/k, k]."""
    from mellum.config import get_config
    from mellum.model import Transformer
    from mellum.train.grpo import _sequence_batch
    from mellum.train.rollout import RolloutWorker
    from mellum.train.sft import token_logprobs

    torch.manual_seed(0)
    policy = Transformer(get_config("tiny-dense"))
    reward = UnitTestReward(RewardConfig(timeout_s=2))
    worker = RolloutWorker(policy, tiny_tokenizer, reward, SamplingConfig(group_size=4, max_new_tokens=8), seed=0)
    try:
        batch = worker.generate(_tasks(["a"]))
    finally:
        worker.close()
        reward.close()
    rollouts = batch.groups[0]
    assert len(rollouts) == 4 and all(len(r.infer_logps) == len(r.completion_ids) > 0 for r in rollouts)
    inputs, targets, infer = _sequence_batch(rollouts, tiny_tokenizer.eos_id, "cpu")
    mask = targets >= 0
    with torch.no_grad():
        same = token_logprobs(policy(inputs).logits, targets)
        torch.testing.assert_close(same[mask], infer[mask], rtol=0, atol=1e-4)
        assert not (~icepop_mask(same, infer, 1.01) & mask).any()
        policy.lm_head.weight.add_(torch.randn_like(policy.lm_head.weight))  # the trainer moved on
        moved = token_logprobs(policy(inputs).logits, targets)
    dropped = ~icepop_mask(moved, infer, 2.0) & mask
    ratio = (moved - infer)[mask].exp()
    assert int(dropped.sum()) == int(((ratio < 0.5) | (ratio > 2.0)).sum()) > 0


# ---- learning ---------------------------------------------------------------------------------------------------
OPTIONS = ["n + 1", "2 * n", "abs(n)", "0"]  # distinct first tokens; only "n + 1" passes the tests


def _tasks(names):
    return [UnitTestTask(n, f"def next_{n}(n):\n    return ", "\n", f"assert next_{n}(4) == 5\nassert next_{n}(-2) == -1")
            for n in names]


def test_grpo_raises_mean_reward_on_unit_tested_task(tiny_tokenizer):
    """A tiny model first learns to answer with one of four expressions uniformly (SFT), then GRPO with rewards
    from running the tests teaches it the one that passes — on held-out function names too."""
    from mellum.config import get_config
    from mellum.data.samples import Sample, SegmentEncoder, encode_samples, render_segments
    from mellum.model import Transformer
    from mellum.prompt import get_format
    from mellum.train.sft import train_sft

    train_tasks = _tasks(["alpha", "beta", "gamma", "delta"])
    heldout_tasks = _tasks(["epsilon", "zeta"])
    fmt, encoder = get_format("mellum"), SegmentEncoder(tiny_tokenizer)
    samples = []
    for task in train_tasks + heldout_tasks:
        head = render_segments(fmt, task.path, task.prefix, task.suffix)
        samples += [Sample(head + [("text", o), ("literal", fmt.eos)], "sft", len(head)) for o in OPTIONS]
    warmup = encode_samples(encoder, samples)
    torch.manual_seed(0)
    policy = Transformer(get_config("tiny-dense"))
    train_sft(policy, tiny_tokenizer, warmup, [], FinetuneConfig(
        max_steps=100, batch_size=24, micro_batch=24, max_len=64, eval_every=0,
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, muon=False), schedule=WSDSchedule(3, 0.2)), bar=False)

    grpo = GRPOConfig(sampling=SamplingConfig(group_size=8, prompts_per_step=4, max_new_tokens=6),
                      shaping=RewardShaping(max_new_tokens=6, overlong_buffer=2, concision_coef=0.0), max_staleness=1)
    config = FinetuneConfig(max_steps=15, batch_size=32, micro_batch=32, max_len=64, eval_every=0,
                            optim=OptimConfig(lr=5e-4, weight_decay=0.0, muon=False), schedule=WSDSchedule(0, 0.0))
    result = train_grpo(policy, tiny_tokenizer, train_tasks, config, grpo, bar=False, eval_tasks=heldout_tasks)
    rewards = result["rewards"]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    assert result["eval_reward_after"] > result["eval_reward_before"] + 0.3, result
    assert result["max_staleness_seen"] <= 1  # asynchronous rollouts stay within the bound
    assert result["sandbox_runs"] < 15 * 32  # each distinct (task, completion) ran once


def test_train_grpo_command(tiny_model_dir, tmp_path):
    import json

    from mellum import load_pretrained
    from mellum.cli import main

    base = tiny_model_dir  # read only: the run writes to its own --out
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": t.task_id, "prefix": t.prefix, "suffix": t.suffix,
                                         "test": t.test}) + "\n" for t in _tasks(["a", "b"])))
    out = tmp_path / "run"
    assert main(["train", "grpo", "--model", str(base), "--tasks", str(tasks), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--overlong-buffer", "1",
                 "--test-timeout", "2", "--no-bar"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["batches"] == 2 and len(summary["rewards"]) == 2
    assert sum(summary["statuses"].values()) == 2 * 2 * 2  # every completion was verified
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_batch = [r for r in logged if "reward" in r]
    assert len(per_batch) == 2
    for r in per_batch:  # the update's own statistics reach the log beside the rollout reward
        assert 0 <= r["solved_groups"] <= 2 and 0 <= r["zero_signal_groups"] <= 2 and "shaped_reward" in r
    load_pretrained(out / "model")
    (tmp_path / "bad.jsonl").write_text('{"prefix": "x"}\n')
    assert main(["train", "grpo", "--model", str(base), "--tasks", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "run2")]) == 2
