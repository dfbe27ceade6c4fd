"""Scores of completions: unbiased pass@k, exact match, edit similarity, identifier F1, and confidence intervals."""

from __future__ import annotations

import keyword
import math
import random
import re
from difflib import SequenceMatcher
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Average pass@k over tasks given (n, c) per task."""
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace (CrossCodeEval compares the first line, stripped)."""
    return prediction.strip() == reference.strip()


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - normalized Levenshtein distance, in [0, 1] (CrossCodeEval's "ES", on stripped strings)."""
    a, b = prediction.strip(), reference.strip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs; O(len(a) * len(b)) time, O(min) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def identifiers(code: str) -> list[str]:
    """Identifiers in code order, keywords excluded (a lexical approximation of CrossCodeEval's tree-sitter pass)."""
    return [t for t in _IDENTIFIER.findall(code) if not keyword.iskeyword(t)]


def identifier_f1(prediction: str, reference: str) -> tuple[bool, float]:
    """(identifier exact match, identifier F1) between the identifier sequences (CrossCodeEval "ID match")."""
    pred, ref = identifiers(prediction), identifiers(reference)
    em = pred == ref
    if not pred and not ref:
        return em, 1.0
    if not pred or not ref:
        return em, 0.0
    common = _multiset_overlap(pred, ref)
    if common == 0:
        return em, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return em, 2 * precision * recall / (precision + recall)


def _multiset_overlap(a: list[str], b: list[str]) -> int:
    counts: dict[str, int] = {}
    for token in b:
        counts[token] = counts.get(token, 0) + 1
    overlap = 0
    for token in a:
        if counts.get(token, 0) > 0:
            counts[token] -= 1
            overlap += 1
    return overlap


def similarity_ratio(prediction: str, reference: str) -> float:
    """difflib's ratio (fast, close to edit similarity); used for long strings where Levenshtein is slow."""
    return SequenceMatcher(None, prediction, reference).ratio()


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927); well-behaved at 0% and 100%."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (for continuous scores such as edit similarity)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return (lo, hi)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)
