"""Repository-level benchmark builder: line-completion tasks from a local project whose hidden line uses an
identifier defined in another file of the project.

In the spirit of RepoBench's "cross-file" setting (Liu et al., ICLR 2024): a task hides one whole line of a file
and nothing else; the line must use a name that the project defines in another file and that the file has not used
before the line (outside import statements), so the model must look across files to get it right. Each task carries
the packed context of three settings under the same token budget: no context, files nearest by path distance,
and full retrieval + packing.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from mellum.context.config import ContextConfig
from mellum.context.index import IDENTIFIER, STOPWORDS, ProjectIndex
from mellum.context.packer import ContextPacker, CountSegments, PackResult

SETTINGS: tuple[str, ...] = ("none", "path", "retrieval")
# Sources of each setting; "none" packs no context at all.
SETTING_SOURCES: dict[str, tuple[str, ...]] = {
    "none": (),
    "path": ("path",),
    "retrieval": ("path", "imports", "jaccard", "bm25", "definitions"),
}
_STRING_LITERAL = re.compile(r"""([rbfuRBFU]{0,2})("|')(?:\\.|(?!\2).)*\2""")
_IMPORT_BLOCK = re.compile(r"^\s*(?:from\s+\S+\s+)?import\b.*\(")
_SKIP_LINE = re.compile(r"""^\s*(?:$|#|//|/\*|\*|import\b|from\s+\S+\s+import\b|package\b|@|["']{3}|["'])""")


@dataclass
class RepoTask:
    """One line to complete. `prefix`/`suffix` are the whole file around the hidden line (the prefix ends with
    the line's indentation, the suffix starts with its newline); `contexts[setting]` holds that setting's packed
    pieces with the prefix and suffix trimmed to the same budget."""

    task_id: str
    path: str
    line: int  # 0-based line number of the hidden line
    prefix: str
    suffix: str
    groundtruth: str
    identifier: str  # the cross-file name the line uses
    defined_in: list[str]
    contexts: dict[str, PackResult] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready record (CrossCodeEval-like keys plus one entry per setting)."""
        out = {k: v for k, v in asdict(self).items() if k != "contexts"}
        out["contexts"] = {
            name: {
                "prefix": r.prefix, "suffix": r.suffix, "tokens_used": r.tokens_used,
                "pieces": [{"path": p.path, "text": p.text, "score": p.score, "tokens": p.tokens, "sources": list(p.sources)} for p in r.pieces],
            }
            for name, r in self.contexts.items()
        }
        return out


def eligible_lines(index: ProjectIndex, path: str, max_defs: int, min_chars: int = 8, max_chars: int = 160) -> list[tuple[int, str, list[str]]]:
    """(line number, cross-file identifier, defining files) of the lines of `path` that make good tasks."""
    entry = index.files[path]
    local = {name for name, _ in entry.defs}
    def_lines = {line for _, line in entry.defs}
    seen: set[str] = set()  # identifiers already used above the line (outside imports)
    out = []
    in_import = in_string = False
    for number, line in enumerate(entry.text.split("\n")):
        stripped = line.strip()
        quotes = line.count('"""') + line.count("'''")
        if in_string or quotes:  # docstrings and other triple-quoted text are not code
            in_string = in_string != (quotes % 2 == 1)
            continue
        if in_import:  # inside `from x import (` ... `)` or Go's `import (` ... `)`
            in_import = ")" not in line
            continue
        if _IMPORT_BLOCK.match(line):
            in_import = ")" not in line.split("(", 1)[1]
            continue
        code = _STRING_LITERAL.sub('""', line.split(" #", 1)[0])  # names inside strings and comments are not uses
        words = [w for w in IDENTIFIER.findall(code) if len(w) > 2 and w not in STOPWORDS and not w.startswith("__")]
        if _SKIP_LINE.match(line) or number in def_lines:
            continue
        if min_chars <= len(stripped) <= max_chars:
            for word in words:
                if word in seen or word in local:
                    continue
                places = sorted({p for p, _ in index.definitions_of(word) if p != path})
                if places and len(places) <= max_defs:
                    out.append((number, word, places))
                    break
        seen.update(words)
    return out


def build_tasks(
    root: str | Path | ProjectIndex,
    count_tokens: Callable[[str], int],
    n_tasks: int = 100,
    seed: int = 0,
    budget_tokens: int | None = None,
    config: ContextConfig | None = None,
    languages: Sequence[str] = ("python",),
    max_per_file: int = 2,
    settings: Sequence[str] = SETTINGS,
    count_segments: CountSegments | None = None,
) -> list[RepoTask]:
    """Sample `n_tasks` line-completion tasks from the project at `root` (the same ones for the same seed and
    files) and pack each setting's context under `budget_tokens` (default: the config's prompt budget).

    Counted as `ContextPacker` counts: `count_tokens` over code, `count_segments` over rendered prompt parts (give
    both from a tokenizer, as `ContextPacker.for_tokenizer` does, for budgets exact to the encoded prompt)."""
    unknown = set(settings) - set(SETTING_SOURCES)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    if n_tasks <= 0:
        raise ValueError("n_tasks must be positive")
    index = root if isinstance(root, ProjectIndex) else ProjectIndex(root, config)
    config = config or index.config
    rng = random.Random(seed)
    paths = sorted(p for p, e in index.files.items() if e.language in languages)
    if not paths:
        raise ValueError(f"no {'/'.join(languages)} files under {index.root}")
    rng.shuffle(paths)
    picked: list[tuple[str, int, str, list[str]]] = []
    for path in paths:
        lines = eligible_lines(index, path, config.max_defs_per_name)
        for number, word, places in rng.sample(lines, min(max_per_file, len(lines))):
            picked.append((path, number, word, places))
        if len(picked) >= n_tasks:
            break
    picked = sorted(picked[:n_tasks])
    packers = {
        name: ContextPacker(index if SETTING_SOURCES[name] else None, count_tokens,
                            replace(config, sources=SETTING_SOURCES[name], stable_order=False), count_segments)
        for name in settings
    }
    tasks = []
    for path, number, word, places in picked:
        text = index.files[path].text
        lines = text.split("\n")
        start = sum(len(line) + 1 for line in lines[:number])
        line = lines[number]
        indent = len(line) - len(line.lstrip())
        prefix, groundtruth, suffix = text[: start + indent], line[indent:], text[start + len(line) :]
        task = RepoTask(f"{index.root.name}/{path}:{number + 1}", path, number, prefix, suffix, groundtruth, word, places)
        for name, packer in packers.items():
            task.contexts[name] = packer.pack(path, prefix, suffix, budget_tokens)
        tasks.append(task)
    return tasks
