"""Ranking of context candidates: reciprocal-rank fusion of sources, near-duplicate and cursor-repeat removal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence


@dataclass
class Candidate:
    """A piece of text that may become context: where it comes from and how relevant the sources found it."""

    key: Hashable  # stable identity across requests (chunk id, or (path, index) for given chunks)
    path: str
    text: str
    score: float = 0.0
    sources: tuple[str, ...] = ()
    start_line: int = 0
    _lines: frozenset[str] | None = field(default=None, repr=False)

    @property
    def lines(self) -> frozenset[str]:
        """Its distinct stripped lines, computed when the duplicate checks first ask."""
        if self._lines is None:
            self._lines = line_set(self.text)
        return self._lines


def line_set(text: str) -> frozenset[str]:
    """The distinct non-trivial lines of a text, whitespace-stripped (for duplicate and repeat checks)."""
    return frozenset(s for s in (line.strip() for line in text.splitlines()) if len(s) > 3)


def fuse(rankings: dict[str, Sequence[Hashable]], weights: dict[str, float], k: int) -> list[tuple[Hashable, float, tuple[str, ...]]]:
    """Reciprocal-rank fusion: score(x) = Σ_sources w_s / (k + rank_s(x)), rank from 1 (Cormack et al. 2009).

    Returns (key, score, sources that named it), best first; ties keep the order of first appearance so
    the result is the same on every call.
    """
    scores: dict[Hashable, float] = {}
    named: dict[Hashable, list[str]] = {}
    for source, ranked in rankings.items():
        w = weights.get(source, 1.0)
        for rank, key in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + w / (k + rank)
            named.setdefault(key, []).append(source)
    order = {key: i for i, key in enumerate(scores)}
    return sorted(((key, s, tuple(named[key])) for key, s in scores.items()), key=lambda t: (-t[1], order[t[0]]))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def repeats_cursor(candidate: Candidate, cursor_lines: frozenset[str], threshold: float) -> bool:
    """Does the candidate mostly repeat the text around the cursor? Such context makes models copy it
    (llama.vim drops chunks too similar to the cursor window, REFERENCE.md §3)."""
    if not candidate.lines or not cursor_lines:
        return False
    return len(candidate.lines & cursor_lines) / len(candidate.lines) >= threshold


def redundant(candidate: Candidate, chosen: Iterable[Candidate], cursor_lines: frozenset[str], duplicate_jaccard: float, cursor_overlap: float) -> bool:
    """Is the candidate empty, a (near) duplicate of one already chosen, or a repeat of the cursor window?"""
    if not candidate.text.strip() or repeats_cursor(candidate, cursor_lines, cursor_overlap):
        return True
    return any(candidate.text == other.text or jaccard(candidate.lines, other.lines) >= duplicate_jaccard for other in chosen)
