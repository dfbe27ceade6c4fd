from mellum.postprocess import trim_trailing_whitespace


def test_trailing_blank_lines_and_spaces_dropped(at):
    assert trim_trailing_whitespace("\n    return x\n\n   ", at("def f(x):█\n")) == "\n    return x"


def test_whitespace_only_becomes_empty(at):
    assert trim_trailing_whitespace(" \n\t\n", at("x = █\n")) == ""


def test_line_break_kept_before_text_after_cursor(at):
    cur = at("import os\n█def main():\n")
    assert trim_trailing_whitespace("import sys\n\n    ", cur) == "import sys\n\n"
