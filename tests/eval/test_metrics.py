"""Metrics against their definitions: pass@k vs the combinatorial formula, edit distance, identifiers, intervals."""

from __future__ import annotations

from math import comb

import pytest

from mellum.eval import metrics


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10), (200, 17, 100)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = 1 - comb(n - c, k) / comb(n, k)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="needs at least"):
        metrics.pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)
    assert metrics.mean_pass_at_k([(2, 1), (2, 2)], 1) == pytest.approx(0.75)


def test_edit_distance_and_similarity():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.edit_similarity("abc", "abc") == 1.0
    assert metrics.edit_similarity("  x = 1 ", "x = 1") == 1.0  # stripped, as CrossCodeEval does
    assert metrics.edit_similarity("abcd", "abce") == pytest.approx(0.75)
    assert metrics.exact_match(" foo(x)\n", "foo(x)") and not metrics.exact_match("foo(y)", "foo(x)")


def test_identifier_match_and_f1():
    em, f1 = metrics.identifier_f1("result = compute(a, b)", "result = compute(a, b)")
    assert em and f1 == 1.0
    em, f1 = metrics.identifier_f1("result = compute(a)", "result = compute(a, b)")
    assert not em and f1 == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert metrics.identifiers("if x is not None: return y") == ["x", "y"]  # keywords are not identifiers
    assert metrics.identifier_f1("", "foo") == (False, 0.0)


def test_wilson_interval():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = metrics.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = metrics.wilson_interval(10, 10)
    assert hi == 1.0 and lo < 1.0


def test_bootstrap_and_percentile():
    values = [0.0] * 50 + [1.0] * 50
    lo, hi = metrics.bootstrap_interval(values, samples=500, seed=1)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert metrics.bootstrap_interval(values, samples=500, seed=1) == (lo, hi)  # deterministic per seed
    assert metrics.percentile([1, 2, 3, 4], 50) == 2.5
    assert metrics.percentile(list(range(101)), 99) == 99
