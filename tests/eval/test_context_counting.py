"""Eval packs context under its budgets counting tokens exactly as the native completer encodes the prompt.

The prompt encodes code as plain text (`Tokenizer.encode_segments`): a `<|endoftext|>` typed in a source file is the
tokens of its characters, not one control token. Counting it as one (`allow_special=True`, as eval once did) let
CrossCodeEval's and repo-bench's packed context overflow the budget they report.
"""

from __future__ import annotations

import gzip
import json

import pytest

from mellum.commands.eval import _counting, _make
from mellum.eval.completer import NativeCompleter
from mellum.eval.tasks.cceval import CrossCodeEval
from mellum.eval.tasks.repo_bench import RepoBench
from mellum.prompt import ContextFile

# Control-token strings as code holds them, e.g. a tokenizer's own source: data, not prompt structure.
SPECIALS = '"<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<filename>", "<reponame>"'


@pytest.fixture(scope="module")
def completer():
    from mellum.assets import default_model_dir

    completer = NativeCompleter(default_model_dir())  # the bundled mellum-tiny: its real tokenizer and format
    yield completer
    completer.close()


def _encoded(completer, path: str, prefix: str, suffix: str, context) -> int:
    """Tokens of the prompt exactly as the completer's service encodes it (no context packing of its own)."""
    return len(completer.service._encode(path, prefix, suffix, list(context), truncated=False).ids)


def _context_tokens(completer, problem) -> int:
    """Tokens the problem's context files add to its encoded prompt (each block opens with a control token, so
    blocks add up exactly)."""
    with_context = _encoded(completer, problem.path, problem.prefix, problem.suffix, problem.context)
    return with_context - _encoded(completer, problem.path, problem.prefix, problem.suffix, [])


def _allow_special(completer):
    """The old count: special-token strings anywhere, code included, read as one control token each."""
    return lambda text: completer.service.tokenizer.count(text, allow_special=True)


def _cceval_data(root):
    folder = root / "crosscodeeval-subset"
    folder.mkdir()
    rows = []
    for task in range(3):
        chunks = [
            {"filename": f"pkg/tokens_{i}.py", "score": 1.0 / (i + 1),
             "retrieved_chunk": "".join(f"STOP_{task}_{i}_{j} = [{SPECIALS}]\n" for j in range(2))}
            for i in range(8)
        ]
        rows.append({
            "metadata": {"task_id": f"demo/{task}", "repository": "demo", "file": "pkg/main.py"},
            "crossfile_context": {"list": chunks},
            "prompt": f"from pkg import tokens_0\n\n\ndef stop_words_{task}():\n    return ",
            "right_context": "\n",
            "groundtruth": f"tokens_0.STOP_{task}_0_0",
        })
    with gzip.open(folder / "tabby_sample_python_bm25cfc_100.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_cceval_packs_code_holding_control_token_strings_within_the_encoded_budget(completer, tmp_path):
    data = _cceval_data(tmp_path)
    budget = 200
    bench = _make("cceval", data, "packed", completer)  # as `mellum eval cceval --model` builds it
    bench.context_tokens = budget
    problems = bench.load()
    assert len(problems) == 3
    for problem in problems:
        assert len(problem.context) >= 2  # several chunks fit: the budget is really spent
        assert _context_tokens(completer, problem) <= budget
    # The old count read each special string as one token: it packed more chunks than the budget holds.
    old = CrossCodeEval(data, "packed", count_tokens=_allow_special(completer))
    old.context_tokens = budget
    over = [_context_tokens(completer, p) for p in old.load()]
    assert min(over) > budget, over


def _project(root, specials_lines: int = 40):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "shapes.py").write_text(
        "class Rectangle:\n    def __init__(self, width, height):\n        self.width = width\n"
        "        self.height = height\n\n    def area(self):\n        return self.width * self.height\n\n\n"
        + "".join(f"SEPARATORS_{j} = [{SPECIALS}]\n" for j in range(specials_lines)))
    for i in range(3):
        (root / "pkg" / f"use_{i}.py").write_text(
            "from pkg.shapes import Rectangle\n\n"
            + "".join(f"MARKERS_{i}_{j} = [{SPECIALS}]\n" for j in range(specials_lines))
            + f"\n\ndef build_{i}(n):\n    shape = Rectangle(n, {i} + n)\n    return shape.area() + {i}\n")
    return root


@pytest.mark.parametrize("setting", ["none", "path", "retrieval"])
def test_repo_bench_prompt_holding_control_token_strings_fits_the_encoded_budget(completer, tmp_path, setting):
    repo = _project(tmp_path / "proj")
    budget = 256
    bench = RepoBench(repo, setting, tasks=6, budget=budget, **_counting(completer))
    problems = bench.load()
    assert problems
    for problem in problems:
        assert problem.meta["defined_in"] == ["pkg/shapes.py"]
        assert "<|endoftext|>" in problem.prefix  # the code's own special strings reach the prompt
        assert _encoded(completer, problem.path, problem.prefix, problem.suffix, problem.context) <= budget
        if setting == "path":
            assert problem.context  # room was left for context, and it was used
    # The old count undercounted the prefix (and context) of such files: the prompt overflowed the budget.
    old = RepoBench(repo, setting, tasks=6, budget=budget, count_tokens=_allow_special(completer)).load()
    assert all(_encoded(completer, p.path, p.prefix, p.suffix, p.context) > budget for p in old)


def test_counting_follows_the_completer(completer):
    from mellum.eval.completer import OpenAICompleter, OracleCompleter

    native = _counting(completer)
    assert native == {"count_tokens": completer.count_tokens, "count_segments": completer.count_segments,
                      "prompt_format": "mellum"}  # the bundled model's format, from its config
    assert _counting(OracleCompleter()) == {}  # no tokenizer: the benchmarks' approximations
    server = OpenAICompleter("http://127.0.0.1:9", prompt_format="starcoder2")
    assert _counting(server) == {"prompt_format": "starcoder2"}  # its literals, approximate counts


def test_native_counts_code_as_text_and_format_literals_as_control_tokens(completer):
    tok = completer.service.tokenizer
    code = f"SEP = [{SPECIALS}]\n"
    segments = [("literal", "<filename>"), ("text", "a.py"), ("literal", "\n"), ("text", code)]
    assert completer.count_segments(segments) == 1 + tok.count("a.py\n" + code)
    assert completer.count_tokens(code) == tok.count(code) > tok.count(code, allow_special=True)
    file = ContextFile("a.py", code)
    block = completer.service.format.context_segments([file])
    added = _encoded(completer, "b.py", "x", "", [file]) - _encoded(completer, "b.py", "x", "", [])
    assert completer.count_segments(block) == added
