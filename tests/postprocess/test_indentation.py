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


def test_file_style_read_from_the_suffix_when_the_prefix_has_no_indented_line(at):
    # The first function of a Go file: nothing indented above the cursor, the rest of the file uses tabs.
    cur = at('package main\n\nfunc main() {█\n}\n\nfunc other() {\n\tx := 1\n\tif x {\n\t\treturn\n\t}\n}\n', path="main.go")
    assert cur.indent_unit == "\t"
    assert normalize_indentation("\n\tfmt.Println(1)\n\tif y {\n\t\tz()\n\t}\n}", cur) == "\n\tfmt.Println(1)\n\tif y {\n\t\tz()\n\t}\n}"
    # A two-space JavaScript file whose first function is being written: the suffix shows the step.
    js = at("function f() {█\n}\n\nfunction g() {\n  if (a) {\n    b();\n  }\n}\n", path="a.js")
    assert normalize_indentation("\n\treturn 1;\n}", js) == "\n  return 1;\n}"


def test_go_file_with_no_indentation_yet_keeps_tabs(at):
    # gofmt indents with tabs: a new Go file must not have the model's tabs turned into spaces.
    cur = at('package main\n\nimport "fmt"\n\nfunc main() {█', path="main.go")
    assert normalize_indentation("\n\tfmt.Println(1)\n}", cur) == "\n\tfmt.Println(1)\n}"
    assert at("def f():█", path="a.py").indent_unit == "    "
