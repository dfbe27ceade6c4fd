from mellum.postprocess import normalize_indentation


def test_doubled_first_line_indent_removed(at):
    # The cursor already sits at the body's indentation; the model indents again.
    assert normalize_indentation("    return x", at("def f(x):\n    █\n")) == "return x"


def test_missing_part_of_indent_kept(at):
    # The file indents by 4; the cursor is at 2 columns of a new body: keep 2 of the model's 4.
    cur = at("def g():\n    if x:\n        pass\n\ndef f(x):\n  █\n")
    assert normalize_indentation("    return x", cur) == "  return x"


def test_following_lines_untouched_when_spaces(at):
    text = "    if x:\n        y()"
    assert normalize_indentation(text, at("def f(x):\n    █\n")) == "if x:\n        y()"


def test_tabs_file_converts_model_spaces(at):
    cur = at("func f() {\n\tif x {\n\t\ty()\n\t}\n█\n}", path="main.go")
    assert normalize_indentation("\tz()\n\tif a {\n        b()\n\t}", cur) == "\tz()\n\tif a {\n\t\tb()\n\t}"


def test_spaces_file_converts_model_tabs(at):
    cur = at("class A:\n    def f(self):\n        █\n")
    assert normalize_indentation("x = 1\n\t\treturn x", cur) == "x = 1\n        return x"


def test_cursor_at_column_zero_untouched(at):
    assert normalize_indentation("    return x", at("def f(x):\n█\n")) == "    return x"
