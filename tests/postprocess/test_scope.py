import pytest

from mellum.postprocess import is_multiline, limit_lines


@pytest.mark.parametrize(
    "marked, multiline",
    [
        ("x = foo(█b)\n", False),  # mid-line: text after the cursor
        ("return a +█ b\n", False),
        ("def f(x):█\n", True),  # end of a line that opens a block
        ("if (x) {█\n}", True),
        ("items = [█]\n", True),  # only an auto-closed bracket after the cursor
        ("def f():\n    █\n", True),  # blank line in a body
        ("x = 1█\n", False),  # end of a finished statement
        ("print(\"hi\")█", False),
    ],
)
def test_multiline_decision(at, marked, multiline):
    assert is_multiline(at(marked)) is multiline


def test_request_overrides_decision(at):
    assert is_multiline(at("x = 1█\n", multiline=True)) is True
    assert is_multiline(at("def f():█\n", multiline=False)) is False


def test_single_line_cut(at):
    assert limit_lines("y = 2\nz = 3", at("x = 1\n█\n", multiline=False)) == "y = 2"
    assert limit_lines("a, b)\nprint(x)", at("foo(█)\n")) == "a, b)\nprint(x)"  # multi-line keeps
    assert limit_lines(" 1 + 2\nfoo()", at("x =█\n")) == " 1 + 2"
