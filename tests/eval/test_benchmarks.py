"""The harness is right before any model is measured: oracle completions pass, empty ones and wrong ones fail.

Small subsets here (full oracle runs are done by hand with `mellum eval ... --oracle`, see docs/eval.md).
"""

from __future__ import annotations

import shutil

import pytest

from mellum.eval.completer import EmptyCompleter, OracleCompleter, Sampling, WrongCompleter
from mellum.eval.sandbox import Sandbox, SandboxConfig
from mellum.eval.tasks import get_benchmark
from mellum.eval.tasks.cceval import CrossCodeEval
from mellum.eval.tasks.safim import normalize_code, outputs_match, truncate_block, truncate_call


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout_s=10))


def _scores(bench, completer, problems, sandbox):
    completer.prepare(problems)
    return [bench.score(p, completer.complete(p, bench, 0, Sampling()), sandbox) for p in problems]


@pytest.mark.parametrize("split", ["single-line", "multi-line", "random-span", "random-span-light"])
def test_humaneval_infilling_oracle_passes(shared_benchmarks, sandbox, split):
    bench = get_benchmark("humaneval-infilling", shared_benchmarks, split)
    problems = bench.load()
    assert len(problems) == {"single-line": 1033, "multi-line": 5815, "random-span": 1640, "random-span-light": 164}[split]
    scores = _scores(bench, OracleCompleter(), problems[:4], sandbox)
    assert all(s.passed for s in scores), [s.reason for s in scores]


def test_humaneval_infilling_empty_and_wrong_fail(shared_benchmarks, sandbox):
    bench = get_benchmark("humaneval-infilling", shared_benchmarks, "multi-line")
    first_per_function = {}
    for problem in bench.load():
        first_per_function.setdefault(problem.meta["entry_point"], problem)
    problems = list(first_per_function.values())[:6]
    assert not any(s.passed for s in _scores(bench, EmptyCompleter(), problems, sandbox))
    wrong = _scores(bench, WrongCompleter(), problems, sandbox)
    assert not any(s.passed for s in wrong)
    assert all(s.reason for s in wrong)  # every failure says why


@pytest.mark.parametrize("name, split", [("humaneval-infilling", "single-line"), ("humaneval", None)])
def test_a_completion_that_exits_cleanly_before_the_tests_is_no_pass(shared_benchmarks, sandbox, name, split):
    """Exit status 0 was a pass: `sys.exit(0)` or `os._exit(0)` in a completion skipped the checker and scored."""
    bench = get_benchmark(name, shared_benchmarks, split)
    problem = next(p for p in bench.load() if not p.reference.rstrip().endswith(":"))  # a line opening no block
    assert bench.score(problem, problem.reference, sandbox).passed
    indent = problem.reference[:len(problem.reference) - len(problem.reference.lstrip(" \t"))]  # the hole's own
    for hack in ("__import__('sys').exit(0)\n", "__import__('os')._exit(0)\n"):
        score = bench.score(problem, indent + hack, sandbox)
        assert not score.passed and "before the tests ended" in score.reason


def test_single_line_postprocess_keeps_one_line(shared_benchmarks):
    bench = get_benchmark("humaneval-infilling", shared_benchmarks, "single-line")
    problem = bench.load()[0]
    assert bench.postprocess(problem, "    x = 1\n    y = 2\n") == "    x = 1\n"
    assert bench.postprocess(problem, "    x = 1") == "    x = 1\n"


@pytest.mark.parametrize("name", ["humaneval", "humaneval-plus", "mbpp-plus"])
def test_generation_oracle_passes_and_empty_fails(shared_benchmarks, sandbox, name):
    bench = get_benchmark(name, shared_benchmarks)
    problems = bench.load()[:2]
    oracle = _scores(bench, OracleCompleter(), problems, sandbox)
    assert all(s.passed for s in oracle), [s.reason for s in oracle]
    empty = _scores(bench, EmptyCompleter(), problems, sandbox)
    assert not any(s.passed for s in empty)
    if name != "humaneval":
        assert all(s.metrics["base"] == 1.0 for s in oracle)


def test_evalplus_catches_a_solution_that_only_passes_base_tests(shared_benchmarks, sandbox):
    bench = get_benchmark("humaneval-plus", shared_benchmarks)
    problem = bench.load()[0]  # has_close_elements
    # Correct on the seven base inputs, wrong when the threshold is tiny (plus inputs include such cases).
    shaky = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:] if threshold > 0.05)\n"
    score = bench.score(problem, shaky, sandbox)
    assert score.metrics["base"] == 1.0
    assert not score.passed and "plus input" in score.reason


@pytest.mark.parametrize("split", ["block", "control"])
def test_safim_python_oracle_passes(shared_benchmarks, sandbox, split):
    bench = get_benchmark("safim", shared_benchmarks, split)
    problems = [p for p in bench.load() if p.language == "python"][:3]
    scores = _scores(bench, OracleCompleter(), problems, sandbox)
    assert all(s.passed for s in scores), [s.reason for s in scores]
    assert not any(s.passed for s in _scores(bench, WrongCompleter(), problems, sandbox))


@pytest.mark.parametrize("language,tool", [("cpp", "g++"), ("java", "javac")])
def test_safim_compiled_languages(shared_benchmarks, sandbox, language, tool):
    bench = get_benchmark("safim", shared_benchmarks, "block")
    problem = next(p for p in bench.load() if p.language == language)
    score = bench.score(problem, problem.reference, sandbox)
    if shutil.which(tool) is None:
        assert score.skipped and tool in score.reason
        return
    assert score.passed, score.reason
    broken = bench.score(problem, problem.reference + " this does not compile (", sandbox)
    assert not broken.passed and "compile error" in broken.reason


def test_safim_csharp_is_reported_skipped(shared_benchmarks, sandbox):
    bench = get_benchmark("safim", shared_benchmarks, "block")
    problem = next(p for p in bench.load() if p.language == "csharp")
    score = bench.score(problem, problem.reference, sandbox)
    assert score.skipped and score.reason.startswith("skipped")


def test_safim_api_matches_syntax_not_spacing(shared_benchmarks, sandbox):
    bench = get_benchmark("safim", shared_benchmarks, "api")
    problems = bench.load()
    assert len(problems) == 310
    assert all(s.passed for s in _scores(bench, OracleCompleter(), problems, sandbox))
    assert not any(s.passed for s in _scores(bench, EmptyCompleter(), problems[:20], sandbox))
    assert normalize_code("np.sum( grad , axis=0 )") == normalize_code("np.sum(grad, axis=0)")
    assert normalize_code("f('a b')") != normalize_code("f('ab')")  # spaces inside strings matter


def test_safim_truncation_and_output_checker():
    assert truncate_call("np.sum(grad, axis=0)\n        grad_X = 1") == "np.sum(grad, axis=0)"
    assert truncate_block("x += 1\n    y = 2\nprint(x)", "python", "for i in r:\n    ") == "x += 1\n    y = 2"
    assert truncate_block("a++;\n\t}\n}\nint z;", "cpp") == "a++;"
    assert outputs_match("1 2\n3\n", ["1 2 3"]) and outputs_match("0.3333333", ["0.33333334"])
    assert not outputs_match("1 2", ["1 2 3"]) and not outputs_match("YES", ["NO"])


def test_safim_checker_compares_integers_exactly():
    # A relative tolerance on integers passed wrong answers: 1000001 for 1000000, 123456800 for 123456789.
    assert not outputs_match("1000001", ["1000000"]) and not outputs_match("3 123456800", ["3 123456789"])
    assert not outputs_match("1000000000000000001", ["1000000000000000000"])
    assert not outputs_match("1_000", ["1000"]) and not outputs_match("infinity", ["inf"])  # not numbers to a judge
    assert outputs_match("007 -0", ["7 0"]) and outputs_match("2.5000001", ["2.5"]) and outputs_match("5.0", ["5"])


@pytest.mark.parametrize("split", ["provided", "none", "packed"])
def test_cceval_oracle_is_exact_and_empty_is_not(shared_benchmarks, split):
    bench = CrossCodeEval(shared_benchmarks, split)
    problems = bench.load()
    assert len(problems) == 100
    if split == "none":
        assert all(not p.context for p in problems)
    else:
        assert sum(bool(p.context) for p in problems) > 90
    oracle = [bench.score(p, p.reference) for p in problems]
    assert all(s.metrics["exact_match"] == 1.0 and s.metrics["edit_similarity"] == 1.0 for s in oracle)
    empty = [bench.score(p, "") for p in problems]
    assert sum(s.metrics["exact_match"] for s in empty) == 0


def test_cceval_packed_context_respects_budget(shared_benchmarks):
    bench = CrossCodeEval(shared_benchmarks, "packed")
    bench.context_tokens = 128
    for problem in bench.load()[:20]:
        assert sum(bench.count_tokens(f"<filename>{c.path}\n{c.text}") for c in problem.context) <= 128
