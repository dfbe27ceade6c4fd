"""HumanEval-Infilling (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle").

Each problem is a HumanEval solution with a hole; the completion is scored by executing
`prompt + completion + suffix + test` and then `check(entry_point)` (openai/human-eval-infilling), pass@k.
"""

from __future__ import annotations

from mellum.eval.tasks import Benchmark, Problem, Score, read_jsonl

FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


def program(prefix: str, completion: str, suffix: str, test: str, entry_point: str) -> str:
    """The executed program: the filled-in file, the benchmark's test, and the call of its checker."""
    return f"{prefix}{completion}{suffix}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEvalInfilling(Benchmark):
    name = "humaneval-infilling"
    splits = tuple(FILES)
    max_new_tokens = 256
    timeout_s = 10.0
    result_settings = ("timeout_s",)

    def __init__(self, data_dir, split=None):
        super().__init__(data_dir, split)
        # Single-line holes are one line: let the service stop at the line's end (Mellum card setting).
        self.multiline = False if self.split == "single-line" else None
        self.max_new_tokens = 64 if self.split == "single-line" else 256

    def load(self) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "humaneval-infilling" / FILES[self.split])
        return [
            Problem(
                task_id=row["task_id"],
                prefix=row["prompt"],
                suffix=row["suffix"],
                reference=row["canonical_solution"],
                path="solution.py",
                meta={"test": row["test"], "entry_point": row["entry_point"]},
            )
            for row in rows
        ]

    def postprocess(self, problem: Problem, completion: str) -> str:
        if self.split == "single-line":
            # The hole is exactly one line including its newline; the suffix starts on the next line.
            line = completion.split("\n", 1)[0]
            return line + "\n" if problem.reference.endswith("\n") else line
        return completion

    def score(self, problem: Problem, completion: str, sandbox) -> Score:
        source = program(problem.prefix, completion, problem.suffix, problem.meta["test"], problem.meta["entry_point"])
        result = sandbox.run_tests(source, config=_config(sandbox, self.timeout_s))
        return Score(passed=result.ok, reason="" if result.ok else result.reason())


def _config(sandbox, timeout_s: float):
    from dataclasses import replace

    return replace(sandbox.config, timeout_s=timeout_s)
