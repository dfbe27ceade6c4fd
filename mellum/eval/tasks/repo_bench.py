"""Repository-level next-line completion built from any repository on disk (in the spirit of RepoBench-C,
Liu et al. 2023): hide one line of a source file, give the model the rest of the file and context packed from
the repository by `mellum.context` (the hidden line removed from the index first), score by match.
"""

from __future__ import annotations

import random
from pathlib import Path

from mellum.eval import metrics
from mellum.eval.tasks import Benchmark, Problem, Score
from mellum.prompt import ContextFile

EXTENSIONS = {".py": "python", ".java": "java", ".kt": "kotlin", ".js": "javascript", ".ts": "typescript", ".go": "go"}
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", ".tox", ".mypy_cache"}


class RepoBench(Benchmark):
    name = "repo-bench"
    scoring = "match"
    max_new_tokens = 48
    multiline = False
    min_line_chars = 12  # hidden lines shorter than this are trivial (closing brackets, `else:`)
    min_line_index = 5  # leave the model some of the file before the hole

    def __init__(self, repo, split=None, tasks: int = 100, budget: int = 1024, count_tokens=None, seed: int = 0):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"--repo {repo} is not a directory")
        super().__init__(self.repo, split)
        if tasks < 1:
            raise ValueError(f"--tasks must be at least 1, got {tasks}")
        self.tasks, self.budget, self.seed = tasks, budget, seed
        self.count_tokens = count_tokens or (lambda text: (len(text) + 3) // 4)

    @property
    def title(self) -> str:
        return f"repo-bench/{self.repo.name}"

    def load(self) -> list[Problem]:
        from mellum.context import ContextConfig, ContextPacker, ProjectIndex

        holes = self._holes()
        if not holes:
            raise ValueError(f"no source lines to hide in {self.repo} (looked for {', '.join(EXTENSIONS)} files)")
        index = ProjectIndex(self.repo, ContextConfig())
        packer = ContextPacker(index, self.count_tokens)
        problems = []
        for rel, lines, at in holes:
            original = "".join(lines)
            prefix, reference, suffix = "".join(lines[:at]), lines[at].rstrip("\n"), "".join(lines[at + 1 :])
            suffix = "\n" + suffix if lines[at].endswith("\n") else suffix
            index.update(self.repo / rel, prefix + suffix)  # the hidden line must not leak through the index
            packed = packer.pack(str(self.repo / rel), prefix, suffix, self.budget)
            index.update(self.repo / rel, original)
            problems.append(
                Problem(
                    task_id=f"{rel}:{at + 1}",
                    prefix=prefix,
                    suffix=suffix,
                    reference=reference,
                    path=rel,
                    language=EXTENSIONS[Path(rel).suffix],
                    context=[ContextFile(p.path, p.text) for p in packed.pieces],
                )
            )
        return problems

    def _holes(self) -> list[tuple[str, list[str], int]]:
        """Deterministic (seeded) choice of hidden lines, spread over the repository's files."""
        candidates = []
        for path in sorted(self.repo.rglob("*")):
            if path.suffix not in EXTENSIONS or not path.is_file():
                continue
            if any(part in _SKIP_DIRS or part.startswith(".") for part in path.relative_to(self.repo).parts[:-1]):
                continue
            try:
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            except (UnicodeDecodeError, OSError):
                continue
            rel = path.relative_to(self.repo).as_posix()
            for at in range(self.min_line_index, len(lines)):
                text = lines[at].strip()
                if len(text) >= self.min_line_chars and not text.startswith(("#", "//", "*", '"""', "'''")):
                    candidates.append((rel, lines, at))
        random.Random(self.seed).shuffle(candidates)
        return sorted(candidates[: self.tasks], key=lambda c: (c[0], c[2]))

    def postprocess(self, problem: Problem, completion: str) -> str:
        return completion.split("\n", 1)[0]

    def score(self, problem: Problem, completion: str, sandbox=None) -> Score:
        em = metrics.exact_match(completion, problem.reference)
        es = metrics.edit_similarity(completion, problem.reference)
        id_em, id_f1 = metrics.identifier_f1(completion, problem.reference)
        return Score(
            passed=em,
            metrics={"exact_match": float(em), "edit_similarity": es, "identifier_em": float(id_em), "identifier_f1": id_f1},
        )
