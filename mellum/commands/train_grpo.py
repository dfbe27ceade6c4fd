"""`mellum train grpo`: reinforcement learning with verifiable rewards (GRPO) on unit-tested completion tasks.

Tasks are JSONL lines {"task_id", "prefix", "suffix", "test"} (the HumanEval record shape with `prompt` and
`entry_point` is accepted; never train on an evaluation benchmark itself): the engine samples `--group-size` middles per task, each program `prefix + middle + suffix + test` runs in the sandbox
(time and memory limits, no network), and passing earns reward 1. Advantages are normalised within each group;
the clipped objective drops tokens whose trainer/inference probability ratio leaves [1/k, k] (IcePop).
"""

from __future__ import annotations

import argparse
import sys

HELP = "reinforcement learning with verifiable rewards (GRPO)"


def configure(parser: argparse.ArgumentParser) -> None:
    from mellum.commands.train_sft import add_common_arguments

    parser.epilog = "example: mellum train grpo --model runs/sft/model --tasks tasks.jsonl --out runs/grpo --max-steps 50"
    parser.add_argument("--tasks", required=True, help="training tasks (JSONL with prefix, suffix, test)")
    parser.add_argument("--eval-tasks", help="held-out tasks: mean reward before and after training")
    parser.add_argument("--group-size", type=int, default=8, help="completions sampled per task (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest completion (default 128)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--clip-low", type=float, default=0.2, help="PPO clip below 1 (default 0.2)")
    parser.add_argument("--clip-high", type=float, default=0.28, help="PPO clip above 1 (DAPO clip-higher, 0.28)")
    parser.add_argument("--icepop-k", type=float, default=2.0,
                        help="IcePop band [1/k, k] of π_train/π_infer (default 2)")
    parser.add_argument("--max-staleness", type=int, default=1,
                        help="rollouts may come from weights this many updates old (0: synchronous; default 1)")
    parser.add_argument("--updates-per-batch", type=int, default=1,
                        help="optimizer steps per rollout batch (default 1)")
    parser.add_argument("--overlong-buffer", type=int, default=16,
                        help="soft overlong penalty ramp, in tokens (default 16)")
    parser.add_argument("--concision", type=float, default=0.1,
                        help="largest penalty for the longest correct completion of a group (0: off; default 0.1)")
    parser.add_argument("--test-timeout", type=float, default=5.0, help="seconds per sandboxed test run (default 5)")
    parser.add_argument("--test-memory-mb", type=int, default=1024,
                        help="memory limit per sandboxed test run in MB (default 1024)")
    parser.add_argument("--engine-int8", action="store_true", help="sample from int8 weights (CPU speed)")
    add_common_arguments(parser, steps=50, lr=1e-5, batch=4)
    parser.set_defaults(batch_size=4)
    for action in parser._actions:
        if action.dest == "batch_size":
            action.help = "tasks per step (each sampled --group-size times; default 4)"
        elif action.dest == "resume":
            action.help = "not supported yet: grpo runs start from --model (refused)"


def run(args) -> int:
    from mellum.commands.train_sft import finetune_config, finish, load_model_and_tokenizer, prepare_out
    from mellum.train.grpo import GRPOConfig, train_grpo
    from mellum.train.rewards import RewardConfig, RewardShaping, read_tasks
    from mellum.train.rollout import SamplingConfig

    tasks = read_tasks(args.tasks)
    eval_tasks = read_tasks(args.eval_tasks) if args.eval_tasks else None
    if args.resume:
        raise ValueError("grpo runs do not resume yet: start a new run from the exported model (--model OUT/model)")
    out = prepare_out(args, {"--tasks": args.tasks, "--eval-tasks": args.eval_tasks})
    config = finetune_config(args)
    config.micro_batch = max(config.micro_batch, 1)
    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    grpo = GRPOConfig(
        clip_low=args.clip_low, clip_high=args.clip_high, icepop_k=args.icepop_k, max_staleness=args.max_staleness,
        updates_per_batch=args.updates_per_batch,
        sampling=SamplingConfig(group_size=args.group_size, prompts_per_step=args.batch_size,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                engine_quantize="int8" if args.engine_int8 else None),
        shaping=RewardShaping(max_new_tokens=args.max_new_tokens, overlong_buffer=args.overlong_buffer,
                              concision_coef=args.concision),
        reward=RewardConfig(timeout_s=args.test_timeout, memory_mb=args.test_memory_mb))
    print(f"grpo: {len(tasks)} tasks, {args.batch_size} × {args.group_size} completions per step", file=sys.stderr)
    summary = train_grpo(model, tokenizer, tasks, config, grpo,
                         prompt_format=getattr(model.config, "prompt_format", None) or "mellum",
                         out_dir=out, bar=not args.no_bar, eval_tasks=eval_tasks)
    return finish(args, out, model, tokenizer, summary, "grpo")
