"""Benchmark tasks: what a problem is, how a completion for it is scored, and where the data lives.

Each benchmark module defines a `Benchmark` subclass whose `load(split)` reads the public data (read-only, from
`benchmarks_dir()`) into `Problem`s and whose `score(problem, completion, sandbox)` returns a `Score`.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mellum.eval import metrics
from mellum.prompt import ContextFile


@dataclass
class Problem:
    """One benchmark item: the text around the hole, the reference middle, and what the scorer needs."""

    task_id: str
    prefix: str
    suffix: str
    reference: str
    path: str = "solution.py"  # file name shown to the model
    language: str = "python"
    context: list[ContextFile] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    """Outcome of one completion: `passed` for execution benchmarks, `metrics` for match-based ones."""

    passed: bool
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # e.g. no toolchain for the language: excluded from the averages

    def to_json(self) -> dict:
        out = {"passed": self.passed, "reason": self.reason}
        if self.metrics:
            out["metrics"] = self.metrics
        if self.skipped:
            out["skipped"] = True
        return out


def match_score(completion: str, reference: str) -> Score:
    """Line-completion scoring (CrossCodeEval, repo-bench): exact match passes; edit similarity and identifier
    match and F1 are reported beside it."""
    em = metrics.exact_match(completion, reference)
    es = metrics.edit_similarity(completion, reference)
    id_em, id_f1 = metrics.identifier_f1(completion, reference)
    return Score(
        passed=em,
        metrics={"exact_match": float(em), "edit_similarity": es, "identifier_em": float(id_em), "identifier_f1": id_f1},
    )


class Benchmark:
    """Base class: generation settings, loading and scoring of one benchmark (one split at a time)."""

    name = ""
    splits: tuple[str, ...] = ("default",)
    scoring = "execution"  # or "match": then summaries average `Score.metrics`
    max_new_tokens = 128
    multiline: bool | None = None  # passed to the completion service
    stop: tuple[str, ...] = ()  # extra stop strings for generation
    # Attributes that change a task's result beyond the problem itself (time limits, context budgets): recorded
    # in the results' meta, so that resuming with other values is refused instead of reusing stale results.
    result_settings: tuple[str, ...] = ()

    def __init__(self, data_dir: Path, split: str | None = None):
        self.data_dir = Path(data_dir)
        self.split = split or self.splits[0]
        if self.split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {self.split!r}; choose one of {', '.join(self.splits)}")

    def load(self) -> list[Problem]:
        raise NotImplementedError

    def postprocess(self, problem: Problem, completion: str) -> str:
        """Cut a raw model completion to what the benchmark expects (default: as is)."""
        return completion

    def score(self, problem: Problem, completion: str, sandbox) -> Score:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The `result_settings` of this run, by name."""
        return {name: getattr(self, name) for name in self.result_settings}

    @property
    def title(self) -> str:
        return self.name if self.splits == ("default",) else f"{self.name}/{self.split}"


def benchmarks_dir(override: str | os.PathLike | None = None) -> Path:
    """`--data DIR`, else `$MELLUM_BENCHMARKS`, else `../shared/benchmarks` beside the repository checkout."""
    if override:
        path = Path(override)
    elif os.environ.get("MELLUM_BENCHMARKS"):
        path = Path(os.environ["MELLUM_BENCHMARKS"])
    else:
        path = Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"
    if not path.is_dir():
        raise FileNotFoundError(
            f"benchmark data not found at {path}: pass --data DIR or set MELLUM_BENCHMARKS "
            "(the folder holding humaneval-infilling/, safim/, evalplus/, ...)"
        )
    return path


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a .jsonl or .jsonl.gz file."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file missing: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def literal(value: Any) -> Any:
    """Some releases store dicts/lists as Python reprs inside strings; decode those, pass the rest through."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return json.loads(value)
    return value


def truncate_at(text: str, stops: tuple[str, ...]) -> str:
    """Text up to the earliest stop string."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


BENCHMARKS = {
    "humaneval-infilling": "mellum.eval.tasks.humaneval_infilling:HumanEvalInfilling",
    "safim": "mellum.eval.tasks.safim:Safim",
    "cceval": "mellum.eval.tasks.cceval:CrossCodeEval",
    "humaneval": "mellum.eval.tasks.humaneval:HumanEval",
    "humaneval-plus": "mellum.eval.tasks.humaneval:HumanEvalPlus",
    "mbpp-plus": "mellum.eval.tasks.humaneval:MbppPlus",
}


def get_benchmark(name: str, data_dir: Path, split: str | None = None) -> Benchmark:
    """Instantiate a benchmark by its command name."""
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    module, cls = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(data_dir, split)
