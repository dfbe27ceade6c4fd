"""Repository-level next-line completion built from any repository on disk (in the spirit of RepoBench-C,
Liu et al. 2023): `mellum.context.repobench` hides one line that uses a name defined in another file of the
project; each split is one context setting under the same budget — no context, path-distance files, or full
retrieval + packing — so the gain of project context is measured on the same holes. Scored by match.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mellum.eval.tasks import Benchmark, Problem, Score, match_score
from mellum.prompt import ContextFile

SETTINGS = ("none", "path", "retrieval")


class RepoBench(Benchmark):
    name = "repo-bench"
    scoring = "match"
    max_new_tokens = 48
    multiline = False
    splits = SETTINGS
    result_settings = ("budget",)

    def __init__(self, repo, split="retrieval", tasks: int = 100, budget: int = 1024, count_tokens=None, seed: int = 0,
                 count_segments=None, prompt_format: str = "mellum"):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"--repo {repo} is not a directory")
        super().__init__(self.repo, split)
        if tasks < 1:
            raise ValueError(f"--tasks must be at least 1, got {tasks}")
        self.tasks, self.budget, self.seed = tasks, budget, seed
        # Counted as the completer's prompt encodes it when it has a tokenizer (see `CrossCodeEval`), else about
        # four characters a token.
        self.count_tokens = count_tokens or _approximate_tokens
        self.count_segments = count_segments
        self.prompt_format = prompt_format

    @property
    def title(self) -> str:
        return f"repo-bench/{self.repo.name}/{self.split}"

    def load(self) -> list[Problem]:
        problems = []
        counting = (self.count_tokens, self.count_segments, self.prompt_format)
        for task in _tasks(self.repo, counting, self.tasks, self.seed, self.budget):
            packed = task.contexts[self.split]
            problems.append(
                Problem(
                    task_id=task.task_id,
                    prefix=packed.prefix,
                    suffix=packed.suffix,
                    reference=task.groundtruth,
                    path=task.path,
                    language="python",
                    context=[ContextFile(p.path, p.text) for p in packed.pieces],
                    meta={"identifier": task.identifier, "defined_in": task.defined_in},
                )
            )
        return problems

    def postprocess(self, problem: Problem, completion: str) -> str:
        return completion.split("\n", 1)[0]

    def score(self, problem: Problem, completion: str, sandbox=None) -> Score:
        return match_score(completion, problem.reference)


def _approximate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


@lru_cache(maxsize=4)
def _tasks(repo: Path, counting: tuple, n_tasks: int, seed: int, budget: int):
    """Tasks with all three settings packed, built once and shared by the three splits; `counting` is
    (count_tokens, count_segments, prompt format)."""
    from mellum.context import ContextConfig
    from mellum.context.repobench import build_tasks

    count_tokens, count_segments, prompt_format = counting
    try:
        return build_tasks(repo, count_tokens, n_tasks=n_tasks, seed=seed, budget_tokens=budget,
                           config=ContextConfig(prompt_format=prompt_format), count_segments=count_segments)
    except ValueError as exc:
        raise ValueError(f"cannot build repo-bench tasks from {repo}: {exc}") from None
