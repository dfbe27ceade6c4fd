"""Rollouts for RL: groups of sampled completions from the inference engine, verified, with the sampler's log-probs;
produced synchronously or by a background thread from slightly older weights (bounded staleness).

The inference side is a separate copy of the policy inside a `mellum.engine.NativeEngine` (its own dtype, optionally
int8 weights), so what is sampled is what a deployment would sample; the trainer pushes new weights after each
update. The log-probabilities of the sampled tokens under the inference copy (`infer_logps`) are what per-token
IcePop compares the trainer's against. Asynchronous rollouts (Mellum 2 report, REFERENCE.md §2; AReaL/PipelineRL
style) let generation of batch n+1 overlap the update on batch n; `max_staleness` bounds how many updates behind the
weights that generated a batch may be.
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from mellum.engine import NativeEngine, SamplingParams
from mellum.train.rewards import UnitTestReward, UnitTestTask, Verdict


@dataclass
class Rollout:
    """One sampled completion. `completion_ids` include the stop token when generation stopped on it."""

    task: UnitTestTask
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    truncated: bool  # stopped by the length limit, not by the model
    infer_logps: torch.Tensor  # [len(completion_ids)] log-probs of the sampled tokens under the inference copy
    verdict: Verdict | None = None
    version: int = 0  # weight version that generated it (number of updates the trainer had made)


@dataclass
class RolloutBatch:
    groups: list[list[Rollout]]
    version: int
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingConfig:
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    engine_quantize: str | None = None  # "int8": sample from int8 weights (a real train/inference mismatch)
    engine_dtype: str = "float32"


class RolloutWorker:
    """Generates groups with an engine over its own copy of the policy; `load_weights` syncs it with the trainer."""

    def __init__(self, policy, tokenizer, reward: UnitTestReward, config: SamplingConfig,
                 prompt_format: str = "mellum", seed: int = 0):
        from mellum.prompt import get_format

        self.tokenizer, self.reward, self.config, self.seed = tokenizer, reward, config, seed
        self.format = get_format(prompt_format)
        model = copy.deepcopy(policy).cpu().float()
        model.requires_grad_(False)
        # No prefix cache (its KV would outlive a weight update) and no speculation: plain sampled decoding.
        self.engine = NativeEngine(model, device="cpu", dtype=getattr(torch, config.engine_dtype),
                                   quantize=config.engine_quantize, speculative=None, prefix_cache_mb=0,
                                   max_batch=config.group_size)
        self.version = 0
        self._lock = threading.Lock()
        self._calls = 0

    def load_weights(self, policy, version: int) -> None:
        """Copy the trainer's weights into the inference copy (waits for a generation in progress to end)."""
        state = {k: v.detach().to("cpu") for k, v in policy.state_dict().items()}
        with self._lock:
            if self.config.engine_quantize:  # quantized weights are rebuilt from the new full-precision ones
                fresh = copy.deepcopy(policy).cpu().float()
                fresh.load_state_dict(state)
                fresh.requires_grad_(False)
                self.engine.close()
                self.engine = NativeEngine(fresh, device="cpu", dtype=getattr(torch, self.config.engine_dtype),
                                           quantize=self.config.engine_quantize, speculative=None,
                                           prefix_cache_mb=0, max_batch=self.config.group_size)
            else:
                self.engine.load_weights(state)
            self.version = version

    def prompt_ids(self, task: UnitTestTask) -> list[int]:
        return self.tokenizer.encode(self.format.render(task.path, task.prefix, task.suffix), allow_special=True)

    def generate(self, tasks: Sequence[UnitTestTask], call: int | None = None) -> RolloutBatch:
        """`group_size` completions per task (sampled with seeds derived from the worker seed and `call`), verified."""
        cfg = self.config
        call = self._calls if call is None else call
        self._calls = call + 1
        eos = self.tokenizer.eos_id
        with self._lock:
            version = self.version
            groups = []
            for t, task in enumerate(tasks):
                prompt = self.prompt_ids(task)
                seqs = []
                for g in range(cfg.group_size):
                    seed = int(np.random.default_rng([self.seed, call, t, g]).integers(2**31))
                    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p, seed=seed, stop_ids=(eos,))
                    seqs.append(self.engine.submit(prompt, params))
                results = [self.engine.wait(s) for s in seqs]
                group = []
                for result in results:
                    ids = list(result.tokens) + ([eos] if result.stop_reason == "stop" else [])
                    group.append(Rollout(task, prompt, ids, self.tokenizer.decode(result.tokens),
                                         result.stop_reason != "stop", torch.empty(0), version=version))
                groups.append(group)
            self._score_inference_logps([r for g in groups for r in g])
        verdicts = self.reward.score_many([(r.task, r.text) for g in groups for r in g])
        for r, v in zip((r for g in groups for r in g), verdicts):
            r.verdict = v
        rewards = [v.reward for v in verdicts]
        statuses: dict[str, int] = {}
        for v in verdicts:
            statuses[v.status] = statuses.get(v.status, 0) + 1
        return RolloutBatch(groups, version, {"reward": float(np.mean(rewards)), "statuses": statuses})

    @torch.no_grad()
    def _score_inference_logps(self, rollouts: Sequence[Rollout]) -> None:
        """log-probs of the sampled tokens under the inference copy (one forward per group, the engine's weights)."""
        from mellum.train.dpo import response_batch
        from mellum.train.sft import token_logprobs

        for i in range(0, len(rollouts), self.config.group_size):
            chunk = [r for r in rollouts[i:i + self.config.group_size] if r.completion_ids]
            if not chunk:
                continue
            inputs, targets = response_batch([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk],
                                             self.tokenizer.eos_id)
            logits = self.engine.model(inputs).logits  # [G, T, V]
            logps = token_logprobs(logits, targets, self.config.temperature)  # [G, T]
            for b, r in enumerate(chunk):
                start = len(r.prompt_ids) - 1
                r.infer_logps = logps[b, start:start + len(r.completion_ids)].float().clone()

    def close(self) -> None:
        self.engine.close()


class AsyncRollouts:
    """Background producer of rollout batches. Batch n is generated from weights of version ≥ n − max_staleness
    (the trainer has made that many updates); `max_staleness=0` is synchronous on-policy RL."""

    def __init__(self, worker: RolloutWorker, next_tasks: Callable[[int], Sequence[UnitTestTask]],
                 max_staleness: int = 1, total: int | None = None):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.worker, self.next_tasks, self.max_staleness, self.total = worker, next_tasks, max_staleness, total
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._trainer_version = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mellum-rollouts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set() and (self.total is None or n < self.total):
                with self._cond:
                    # Wait until the worker holds weights recent enough for batch n.
                    while self.worker.version < n - self.max_staleness and not self._stop.is_set():
                        self._cond.wait(0.1)
                if self._stop.is_set():
                    break
                self._queue.put(self.worker.generate(self.next_tasks(n), call=n))
                n += 1
        except BaseException as exc:  # surfaced to the trainer on its next `get`
            self._queue.put(exc)

    def get(self, timeout: float | None = None) -> RolloutBatch:
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise RuntimeError(f"rollout generation failed: {item}") from item
        return item

    def updated(self, policy, version: int) -> None:
        """The trainer finished update `version`: push its weights to the worker and wake the producer."""
        self.worker.load_weights(policy, version)
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=60)
