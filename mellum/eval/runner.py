"""Runner: completes and scores a benchmark's problems, one JSONL line per task, resuming an interrupted run.

The result file is appended one fsync'd line at a time, so after a crash or Ctrl-C every finished task is kept
and a rerun with the same settings does only the rest. A sidecar `<results>.meta.json` records the settings;
resuming with different ones is refused (rather than silently mixing two runs in one file).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mellum.eval.completer import Completer, Sampling
from mellum.eval.report import write_atomic
from mellum.eval.sandbox import Sandbox
from mellum.eval.tasks import Benchmark, Problem


@dataclass(frozen=True)
class RunConfig:
    """What to run: `n` samples per task (pass@k needs n >= k), a task limit, parallel workers, a language filter."""

    n: int = 1
    limit: int | None = None
    workers: int = 1
    languages: tuple[str, ...] = ()  # keep only problems in these languages (SAFIM, CrossCodeEval)
    sampling: Sampling = Sampling()
    fresh: bool = False  # discard an existing result file instead of resuming
    nll: bool = False  # also score the reference's log-likelihood (native model; tasks with a reference)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--n must be at least 1, got {self.n}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.sampling.temperature < 0:
            raise ValueError(f"--temperature must be 0 (greedy) or more, got {self.sampling.temperature}")
        if not 0 < self.sampling.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.sampling.top_p}")
        if self.n > 1 and self.sampling.temperature == 0:
            raise ValueError("n > 1 samples with temperature 0 are all the same greedy completion: set --temperature")


def select(problems: list[Problem], config: RunConfig) -> list[Problem]:
    """The problems of a run: filtered by language, then the first `limit` (a stable, reproducible subset)."""
    if config.languages:
        known = {p.language for p in problems}
        unknown = set(config.languages) - known
        if unknown:
            raise ValueError(f"no problems in {', '.join(sorted(unknown))}; this benchmark has {', '.join(sorted(known))}")
        problems = [p for p in problems if p.language in config.languages]
    return problems[: config.limit] if config.limit else problems


def run(
    bench: Benchmark,
    completer: Completer,
    results_path: Path,
    config: RunConfig = RunConfig(),
    sandbox: Sandbox | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) a benchmark; returns one record per selected task, in problem order."""
    sandbox = sandbox or Sandbox()
    if config.nll and type(completer).reference_nll is Completer.reference_nll:
        raise ValueError(f"--nll needs a model run in-process (--model); the {completer.name} completer cannot "
                         "score text")
    problems = select(bench.load(), config)
    completer.prepare(problems)
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": bench.title, "n": config.n, "temperature": config.sampling.temperature,
            "top_p": config.sampling.top_p, "seed": config.sampling.seed, **completer.describe(),
            **bench.settings()}
    if config.nll:
        meta["nll"] = True
    # Settings recorded since 2026-11 (quantization, the benchmark's time limit or context budget) are absent from
    # older meta files: their absence is not a change, so those runs still resume.
    done = _resume(results_path, meta, config.fresh, recorded_later={"quantize", *bench.settings()})
    todo = [p for p in problems if p.task_id not in done]
    lock = threading.Lock()
    bar = _progress(len(problems), len(problems) - len(todo), bench.title, progress)
    with open(results_path, "a", encoding="utf-8") as out:

        def finish(record: dict) -> None:
            with lock:
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
                done[record["task_id"]] = record
                bar.update(1)

        if config.workers == 1:
            for problem in todo:
                finish(_one(bench, completer, problem, config, sandbox))
        else:
            with ThreadPoolExecutor(config.workers) as pool:
                futures = [pool.submit(_one, bench, completer, p, config, sandbox) for p in todo]
                for future in as_completed(futures):
                    finish(future.result())
    bar.close()
    return [done[p.task_id] for p in problems]


def _one(bench: Benchmark, completer: Completer, problem: Problem, config: RunConfig, sandbox: Sandbox) -> dict:
    start = time.monotonic()
    completions, results = [], []
    for sample in range(config.n):
        t0 = time.monotonic()
        raw = completer.complete(problem, bench, sample, config.sampling)
        generate_s = time.monotonic() - t0
        text = bench.postprocess(problem, raw) if completer.postprocess else raw
        score = bench.score(problem, text, sandbox)
        completions.append(text)
        results.append(dict(score.to_json(), generate_s=round(generate_s, 4)))
    record = {
        "task_id": problem.task_id,
        "language": problem.language,
        "completions": completions,
        "results": results,
        "n": config.n,
        "passed": sum(r["passed"] for r in results),
        "skipped": all(r.get("skipped") for r in results),
        "seconds": round(time.monotonic() - start, 3),
    }
    if config.nll:
        scored = completer.reference_nll(problem, bench)
        if scored is not None:
            record["reference_nll"], record["reference_tokens"] = round(scored[0], 5), scored[1]
    return record


def _resume(path: Path, meta: dict, fresh: bool, recorded_later=frozenset()) -> dict[str, dict]:
    meta_path = path.with_name(path.name + ".meta.json")
    if fresh or not path.exists():
        path.unlink(missing_ok=True)
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
        return {}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        changed = {k: (old.get(k), v) for k, v in meta.items()
                   if old.get(k) != v and (k in old or k not in recorded_later)}
        if changed:
            detail = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise FileExistsError(f"{path} holds results of a different run ({detail}); pass --fresh to start over "
                                  "or --out another folder")
    else:
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    done: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: that task is simply run again
        done[record["task_id"]] = record
    if lines and not lines[-1].endswith("\n"):
        # Drop the torn tail so appended lines start on a fresh line.
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in done.values()))
    return done


def _progress(total: int, initial: int, title: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=title, unit="task", disable=not enabled, dynamic_ncols=True)
