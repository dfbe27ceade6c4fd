"""Verifiable rewards: a completion scores 1 when its program passes the task's unit tests in the sandbox, else 0.

RLVR (Mellum 2 report, REFERENCE.md §2): the reward comes from executing tests, never from a learned judge.
Completions are untrusted model output, so every program runs in `mellum.eval.sandbox` (time, memory and process
limits, no network, private temporary directory): one that loops, exhausts memory, forks or opens a socket is
stopped, scores 0, and training goes on. Verification is decoupled from generation (its own thread pool), and a
completion already verified for a task is not run again (tests are deterministic).

A clean exit is not a pass: `Sandbox.run_tests` scores only a program that ran its tests to their end, so a
completion that calls `sys.exit(0)` or `os._exit(0)` (the classic reward hack of RL on unit tests) gets 0.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from mellum.train.records import read_jsonl


@dataclass(frozen=True)
class UnitTestTask:
    """A function to complete: the model fills the middle between `prefix` and `suffix`; the program
    `prefix + completion + suffix + "\\n" + test` must run to the end of `test` (e.g. `assert` statements; a test
    that exits itself, such as `unittest.main()`, needs `exit=False`) and exit cleanly."""

    task_id: str
    prefix: str
    suffix: str
    test: str
    path: str = "solution.py"

    def program(self, completion: str) -> str:
        return self.prefix + completion + self.suffix + "\n" + self.test + "\n"


@dataclass(frozen=True)
class Verdict:
    reward: float
    status: str  # sandbox status (ok, error, timeout, memory, killed), or "exited": exit 0 before the tests ended
    reason: str = ""


@dataclass(frozen=True)
class RewardConfig:
    """Limits of one test run (small: a unit test of a short function needs little) and the verifier's threads."""

    timeout_s: float = 3.0
    memory_mb: int = 512
    max_processes: int = 16
    workers: int = 2
    cache: bool = True


class UnitTestReward:
    """Scores completions by running their tests in the sandbox; thread-safe, with a per-(task, completion) cache."""

    def __init__(self, config: RewardConfig = RewardConfig()):
        from mellum.eval.sandbox import Sandbox, SandboxConfig

        self.config = config
        self.sandbox = Sandbox(SandboxConfig(timeout_s=config.timeout_s, memory_mb=config.memory_mb,
                                             max_processes=config.max_processes))
        self._cache: dict[tuple[str, str], Verdict] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="mellum-verify")
        self.executions = 0  # programs actually run (cache misses)

    def score(self, task: UnitTestTask, completion: str) -> Verdict:
        key = (task.task_id, completion)
        if self.config.cache:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
        result = self.sandbox.run_tests(task.program(completion))  # a pass runs its tests to their end
        verdict = Verdict(1.0 if result.ok else 0.0, result.status, "" if result.ok else result.reason(200))
        with self._lock:
            self.executions += 1
            if self.config.cache:
                self._cache[key] = verdict
        return verdict

    def score_many(self, items: Sequence[tuple[UnitTestTask, str]]) -> list[Verdict]:
        """Verdicts in order; distinct programs run in parallel on the verifier's threads."""
        unique = list(dict.fromkeys((t.task_id, c) for t, c in items))
        by_key = {(t.task_id, c): t for t, c in items}
        verdicts = dict(zip(unique, self._pool.map(lambda k: self.score(by_key[k], k[1]), unique)))
        return [verdicts[(t.task_id, c)] for t, c in items]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def read_tasks(path: str | os.PathLike) -> list[UnitTestTask]:
    """Tasks from JSONL: {"task_id", "prefix" (or "prompt"), "suffix"?, "test", "entry_point"?, "path"?}; with an
    `entry_point`, `check(entry_point)` is appended to the test (the HumanEval record shape). Evaluation
    benchmarks are for measuring, never for training: write training tasks of your own in this shape."""
    tasks = []
    for where, n, r in read_jsonl(path, "no task file"):
        prefix = r.get("prefix", r.get("prompt"))
        if not isinstance(prefix, str) or not isinstance(r.get("test"), str):
            raise ValueError(f"{where}: a task needs string fields 'prefix' (or 'prompt') and 'test'")
        test = r["test"] + (f"\ncheck({r['entry_point']})" if r.get("entry_point") else "")
        tasks.append(UnitTestTask(str(r.get("task_id", n)), prefix, r.get("suffix", ""), test,
                                  r.get("path", "solution.py")))
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    return tasks


@dataclass
class RewardShaping:
    """Penalties added to the verified reward (see `shaped_rewards`)."""

    max_new_tokens: int = 64  # L_max of the soft overlong penalty
    overlong_buffer: int = 16  # L_cache: the penalty ramps from 0 to -1 over the last this-many tokens
    overlong_coef: float = 1.0
    concision_coef: float = 0.1  # at most this much is taken from the longest correct completion of a group


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): 0 up to L_max − L_cache,
    then a linear ramp to −1 at L_max, −1 beyond (a completion cut by the length limit)."""
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    if length <= max_tokens and buffer > 0:
        return (start - length) / buffer
    return -1.0


def concision_penalties(rewards: Sequence[float], lengths: Sequence[int], coef: float) -> list[float]:
    """Penalty of each completion of one group: among the *correct* ones (reward > 0), −coef·(L − L_min)/(L_max −
    L_min), so the shortest correct answer loses nothing and the longest loses `coef`; wrong ones are not touched.

    The Mellum 2 report names a concision penalty without its formula (UNCONFIRMED); this is the group-relative
    length penalty of Kimi k1.5 (arXiv:2501.12599 §2.3.3) restricted to correct answers, so it never makes a wrong
    answer look better than a right one when coef < 1.
    """
    correct = [n for r, n in zip(rewards, lengths) if r > 0]
    if coef == 0 or len(correct) < 2 or max(correct) == min(correct):
        return [0.0] * len(rewards)
    lo, hi = min(correct), max(correct)
    return [-coef * (n - lo) / (hi - lo) if r > 0 else 0.0 for r, n in zip(rewards, lengths)]


def shaped_rewards(rewards: Sequence[float], lengths: Sequence[int], truncated: Sequence[bool],
                   shaping: RewardShaping) -> list[float]:
    """Verified reward + soft overlong penalty + concision penalty, for the completions of one group."""
    concise = concision_penalties(rewards, lengths, shaping.concision_coef)
    out = []
    for r, n, cut, c in zip(rewards, lengths, truncated, concise):
        length = shaping.max_new_tokens + 1 if cut else n  # cut by the limit: the full penalty
        out.append(r + c + shaping.overlong_coef * overlong_penalty(length, shaping.max_new_tokens,
                                                                     shaping.overlong_buffer))
    return out
