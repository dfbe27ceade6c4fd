"""Training samples built from corpus files: FIM (SPM/PSM), repository-level packs, and SFT with syntactic middles.

Every sample is a list of segments — ("text", s) for code and ("special", s) for control tokens taken from the
prompt format's templates — so that a special-token string occurring inside code is encoded as plain text, while
the tokenization of each run of text is exactly what `Tokenizer.encode(prompt, allow_special=True)` gives at
serving time for code without such strings. The layout is `mellum.prompt`'s: what is trained is what is served.

- FIM (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"): two uniform
  character-level cut points split a file into prefix/middle/suffix; SPM or PSM order by `spm_rate`.
- Repository-level (Mellum model card, REFERENCE.md §1/§3): other files of the same project as `<filename>` blocks,
  ordered by path distance with the nearest last, then the target file (plain or FIM).
- SFT (Mellum paper: middles are syntactic units of at most ~700 characters, with project context): the middle is a
  tree-sitter node — a block (function or loop body) or a statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Sequence

import numpy as np

from mellum.prompt import ContextFile, PromptFormat, get_format

_FIELD = re.compile(r"\{(path|text|repo|prefix|suffix)\}")  # the field syntax of mellum.prompt templates

Segment = tuple[str, str]  # ("text" | "special", string)


@dataclass(frozen=True)
class SampleConfig:
    """How documents become training samples. Rates are probabilities per document."""

    fim_rate: float = 0.5  # Mellum: FIM on ~50% of samples (REFERENCE.md §1)
    spm_rate: float = 1.0  # share of FIM samples in SPM order (Mellum trains SPM); the rest PSM
    repo_rate: float = 0.0  # share of documents rendered as repository-level samples
    repo_context_chars: int = 16_000  # budget of context file text in a repository-level sample
    repo_max_files: int = 8
    spm_format: str = "mellum"
    psm_format: str = "mellum-psm"
    sft_max_middle_chars: int = 700  # Mellum paper: SFT middles of at most ~700 characters
    sft_min_middle_chars: int = 1

    def __post_init__(self):
        for name in ("fim_rate", "spm_rate", "repo_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class FimSplit:
    prefix: str
    middle: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.middle + self.suffix


def fim_split(text: str, rng: np.random.Generator) -> FimSplit:
    """Character-level split at two uniformly drawn cut points (prefix + middle + suffix == text)."""
    a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return FimSplit(text[:a], text[a:b], text[b:])


# ---- rendering formats into segments ------------------------------------------------------------------------


def _template(template: str, values: dict[str, str]) -> list[Segment]:
    """A template with its fields filled: literal parts are ("literal", s) to be split on special tokens later."""
    out: list[Segment] = []
    pos = 0
    for m in _FIELD.finditer(template):
        if m.start() > pos:
            out.append(("literal", template[pos : m.start()]))
        out.append(("text", values[m.group(1)]))
        pos = m.end()
    if pos < len(template):
        out.append(("literal", template[pos:]))
    return out


def render_segments(
    fmt: PromptFormat,
    path: str,
    prefix: str,
    suffix: str = "",
    context: Sequence[ContextFile] = (),
    repo: str | None = None,
) -> list[Segment]:
    """`fmt.render(...)` as segments; `"".join(s for _, s in segments) == fmt.render(...)`."""
    out: list[Segment] = []
    if fmt.repo and repo:
        out += _template(fmt.repo, {"repo": repo})
    for f in context:
        out += _template(fmt.context_file, {"path": f.path, "text": f.text})
    out += _template(fmt.current_file, {"path": path})
    out += _template(fmt.fim, {"prefix": prefix, "suffix": suffix if fmt.supports_suffix else ""})
    return out


def file_segments(fmt: PromptFormat, path: str, text: str, context: Sequence[ContextFile] = (), repo: str | None = None) -> list[Segment]:
    """A whole file without FIM, laid out like a context file (used as the target of a repository sample)."""
    out: list[Segment] = []
    if fmt.repo and repo:
        out += _template(fmt.repo, {"repo": repo})
    for f in list(context) + [ContextFile(path, text)]:
        out += _template(fmt.context_file, {"path": f.path, "text": f.text})
    return out


class SegmentEncoder:
    """Segments → token ids with one `encode_batch` call per batch of samples.

    Literal template text is split on the tokenizer's special tokens; maximal runs of non-special text (template
    literals and code together) are encoded with `allow_special=False`, exactly as serving encodes a rendered
    prompt whose code holds no special strings.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
        self.eos = tokenizer.config.get("eos_token", "<|endoftext|>")

    def check_format(self, fmt: PromptFormat) -> None:
        missing = [t for t in fmt.fim_tokens if self.tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"prompt format {fmt.name!r} needs tokens the tokenizer lacks: {', '.join(missing)}")

    def runs(self, segments: Sequence[Segment]) -> list[tuple[str, str]]:
        """Merge into alternating ("text", run) / ("special", token) pieces."""
        pieces: list[tuple[str, str]] = []
        for kind, s in segments:
            if kind == "literal" and self._split is not None:
                parts = [("special" if i % 2 else "text", p) for i, p in enumerate(self._split.split(s))]
            else:
                parts = [(kind, s)]
            for k, p in parts:
                if not p:
                    continue
                if k == "text" and pieces and pieces[-1][0] == "text":
                    pieces[-1] = ("text", pieces[-1][1] + p)
                else:
                    pieces.append((k, p))
        return pieces

    def encode_many(self, samples: Sequence[Sequence[Segment]]) -> list[list[int]]:
        all_runs = [self.runs(s) for s in samples]
        texts = [p for runs in all_runs for k, p in runs if k == "text"]
        encoded = iter(self.tokenizer.encode_batch(texts, allow_special=False)) if texts else iter(())
        out = []
        for runs in all_runs:
            ids: list[int] = []
            for k, p in runs:
                ids.extend(next(encoded) if k == "text" else [self.tokenizer.id_of(p)])
            out.append(ids)
        return out

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        return self.encode_many([segments])[0]


# ---- samples ---------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One training document: its segments, and which of them are trained on (`target_from`: index of the first
    segment of the loss region; 0 = everything, as in pre-training). `fim` keeps the split for verification."""

    segments: list[Segment]
    kind: str  # "plain" | "fim-spm" | "fim-psm" | "repo" | "repo-fim-spm" | "repo-fim-psm" | "sft"
    target_from: int = 0
    fim: FimSplit | None = None


@lru_cache(maxsize=1 << 16)
def _folders(path: str) -> tuple[str, ...]:
    # Cached: a repository sample ranks every file of its project, so large projects ask for the same paths often.
    return PurePosixPath(path).parent.parts


def path_distance(a: str, b: str) -> int:
    """Directory hops between two files (siblings: 0; a file in a subfolder: 1; ...)."""
    da, db = _folders(a), _folders(b)
    common = 0
    for x, y in zip(da, db):
        if x != y:
            break
        common += 1
    return len(da) + len(db) - 2 * common


def repo_context(target: str, files: Sequence[tuple[str, str]], budget_chars: int, max_files: int) -> list[ContextFile]:
    """Other files of the project, nearest first within the budget, returned farthest first (nearest last)."""
    others = sorted((f for f in files if f[0] != target), key=lambda f: (path_distance(target, f[0]), f[0]))
    chosen, used = [], 0
    for path, text in others:
        if len(chosen) >= max_files:
            break
        if used + len(text) > budget_chars:
            continue
        chosen.append(ContextFile(path, text))
        used += len(text)
    return chosen[::-1]


class SampleBuilder:
    """Turns files into pre-training and SFT samples with one RNG per call site (deterministic given a seed)."""

    def __init__(self, config: SampleConfig | None = None):
        self.config = config or SampleConfig()
        self.spm = get_format(self.config.spm_format)
        self.psm = get_format(self.config.psm_format)

    def _fim(self, path, text, rng, context=(), repo=None, kind_prefix="") -> Sample:
        split = fim_split(text, rng)
        fmt = self.spm if rng.random() < self.config.spm_rate else self.psm
        segments = render_segments(fmt, path, split.prefix, split.suffix, context, repo)
        target_from = len(segments)
        segments = segments + [("text", split.middle), ("literal", fmt.eos)]
        return Sample(segments, f"{kind_prefix}fim-{fmt.order}", target_from, split)

    def pretrain(self, path: str, text: str, rng: np.random.Generator,
                 project_files: Sequence[tuple[str, str]] = (), repo: str | None = None) -> Sample:
        """A file as plain text, FIM, or (at `repo_rate`, when the project has other files) a repository sample."""
        cfg = self.config
        if cfg.repo_rate and len(project_files) > 1 and rng.random() < cfg.repo_rate:
            context = repo_context(path, project_files, cfg.repo_context_chars, cfg.repo_max_files)
            if rng.random() < cfg.fim_rate:
                return self._fim(path, text, rng, context, repo, "repo-")
            segments = file_segments(self.spm, path, text, context, repo) + [("literal", self.spm.eos)]
            return Sample(segments, "repo")
        if rng.random() < cfg.fim_rate:
            return self._fim(path, text, rng)
        return Sample([("text", text), ("literal", self.spm.eos)], "plain")

    def sft(self, path: str, text: str, language: str, rng: np.random.Generator,
            project_files: Sequence[tuple[str, str]] = (), repo: str | None = None) -> Sample | None:
        """An SFT sample whose middle is a syntactic unit; None when the file has no suitable node."""
        spans = syntactic_spans(text, language, self.config.sft_min_middle_chars, self.config.sft_max_middle_chars)
        if not spans:
            return None
        start, end = spans[int(rng.integers(len(spans)))]
        split = FimSplit(text[:start], text[start:end], text[end:])
        context = repo_context(path, project_files, self.config.repo_context_chars, self.config.repo_max_files)
        segments = render_segments(self.spm, path, split.prefix, split.suffix, context, repo)
        target_from = len(segments)
        segments = segments + [("text", split.middle), ("literal", self.spm.eos)]
        return Sample(segments, "sft", target_from, split)


def encode_samples(encoder: SegmentEncoder, samples: Sequence[Sample]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per sample, in one batch: mask 1 from the first token of the target region on."""
    parts = []
    for sample in samples:
        parts += [sample.segments[: sample.target_from], sample.segments[sample.target_from :]]
    encoded = encoder.encode_many(parts)
    out = []
    for i in range(len(samples)):
        head, tail = encoded[2 * i], encoded[2 * i + 1]
        out.append((head + tail, [0] * len(head) + [1] * len(tail)))
    return out


def encode_sample(encoder: SegmentEncoder, sample: Sample) -> tuple[list[int], list[int]]:
    return encode_samples(encoder, [sample])[0]


def parse_fim(decoded: str, fmt: PromptFormat) -> FimSplit:
    """Invert a decoded FIM sample (prompt + middle + eos) back into prefix/middle/suffix (for verification)."""
    tokens = dict(zip(("prefix", "suffix", "middle"), _fim_markers(fmt)))
    body = decoded[decoded.rfind(tokens["prefix"] if fmt.order == "psm" else tokens["suffix"]) :]
    if body.endswith(fmt.eos):
        body = body[: -len(fmt.eos)]
    pre_at, suf_at, mid_at = body.find(tokens["prefix"]), body.find(tokens["suffix"]), body.find(tokens["middle"])
    if fmt.order == "spm":
        suffix = body[suf_at + len(tokens["suffix"]) : pre_at]
        prefix = body[pre_at + len(tokens["prefix"]) : mid_at]
    else:
        prefix = body[pre_at + len(tokens["prefix"]) : suf_at]
        suffix = body[suf_at + len(tokens["suffix"]) : mid_at]
    return FimSplit(prefix, body[mid_at + len(tokens["middle"]) :], suffix)


def _fim_markers(fmt: PromptFormat) -> tuple[str, str, str]:
    """(prefix, suffix, middle) marker strings of a format, read from its `fim` template."""
    parts = [p for p in _FIELD.split(fmt.fim) if p and p not in ("prefix", "suffix")]
    if fmt.order == "spm":  # "<suf>{suffix}<pre>{prefix}<mid>"
        suf, pre, mid = parts
    else:  # "<pre>{prefix}<suf>{suffix}<mid>"
        pre, suf, mid = parts
    return pre, suf, mid


# ---- syntactic units (tree-sitter) ---------------------------------------------------------------------------

_GRAMMARS = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "java": ("tree_sitter_java", "language"),
    "kotlin": ("tree_sitter_kotlin", "language"),
    "go": ("tree_sitter_go", "language"),
}
# Node types that make a good middle: bodies of functions and loops, and single statements.
_BLOCK_TYPES = frozenset({"block", "statement_block", "function_body", "class_body", "control_structure_body"})


@lru_cache(maxsize=None)
def _parser(language: str):
    import importlib

    from tree_sitter import Language, Parser

    module, attr = _GRAMMARS[language]
    return Parser(Language(getattr(importlib.import_module(module), attr)()))


def syntactic_spans(text: str, language: str, min_chars: int = 1, max_chars: int = 700) -> list[tuple[int, int]]:
    """Character spans of blocks and statements of at most `max_chars` characters (empty if no grammar)."""
    if language not in _GRAMMARS:
        return []
    data = text.encode("utf-8")
    tree = _parser(language).parse(data)
    # Byte offset → character offset (tree-sitter reports bytes).
    if len(data) == len(text):
        to_char = None
    else:
        to_char = np.zeros(len(data) + 1, dtype=np.int64)
        char_starts = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
        to_char[char_starts] = np.arange(len(text) + 1)
    spans = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.has_error or not node.is_named:
            continue
        kind = node.type
        if kind in _BLOCK_TYPES or kind.endswith(("_statement", "_declaration")) and kind != "import_statement":
            a, b = node.start_byte, node.end_byte
            if to_char is not None:
                a, b = int(to_char[a]), int(to_char[b])
            if min_chars <= b - a <= max_chars and text[a:b].strip():
                spans.append((a, b))
    return sorted(set(spans))
