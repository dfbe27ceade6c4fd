from mellum.postprocess import limit_to_block


def test_python_body_stops_at_dedent(at):
    text = "\n    return x + 1\n\ndef g():\n    pass"
    assert limit_to_block(text, at("def f(x):█\n")) == "\n    return x + 1\n"


def test_statements_in_body_continue_until_dedent(at):
    cur = at("def f(x):\n    y = x\n    █\n")
    text = "z = y * 2\n    return z\n\nprint(f(1))"
    assert limit_to_block(text, cur) == "z = y * 2\n    return z\n"


def test_brace_block_keeps_its_closing_line(at):
    cur = at("function f(x) {█\n", path="a.js")
    text = "\n  const y = x;\n  return y;\n}\nfunction g() {}"
    assert limit_to_block(text, cur) == "\n  const y = x;\n  return y;\n}"


def test_closing_a_prefix_bracket_ends_the_construct(at):
    cur = at("result = compute(\n    alpha,\n    █\n")
    text = "beta,\n)\nprint(result)"
    assert limit_to_block(text, cur) == "beta,\n)"


def test_unbalanced_closer_on_an_indented_line(at):
    cur = at("call(first,\n     █\n")
    assert limit_to_block("second)\nother()", cur) == "second)"


def test_brackets_inside_strings_are_ignored(at):
    cur = at("def f():\n    █\n")
    text = "s = \")\"\n    t = '}'\n    return s + t\nx = 1"
    assert limit_to_block(text, cur) == "s = \")\"\n    t = '}'\n    return s + t"


def test_dedented_closer_of_an_outer_block_is_dropped(at):
    cur = at("if (a) {\n    if (b) {\n        █\n", path="a.c")
    text = "x();\n    }\n}\n"
    # `}` at 4 closes the inner block the prefix opened: kept; then the construct ended.
    assert limit_to_block(text, cur) == "x();\n    }"


def test_single_line_untouched(at):
    assert limit_to_block("x)", at("foo(█\n")) == "x)"


def test_else_branch_continues_the_block(at):
    text = "\n        return 1\n    else:\n        return 2\n\nprint(f(1))"
    assert limit_to_block(text, at("def f(x):\n    if x:█\n")) == "\n        return 1\n    else:\n        return 2\n"


def test_brace_else_and_catch_continue(at):
    cur = at("try {█\n", path="a.js")
    text = "\n  run();\n} catch (e) {\n  log(e);\n}\nnext();"
    assert limit_to_block(text, cur) == "\n  run();\n} catch (e) {\n  log(e);\n}"


def test_top_level_stops_at_the_next_paragraph(at):
    cur = at("import os\n\n█\n")
    text = "def main():\n    print(os.getcwd())\n\n\ndef other():\n    pass"
    assert limit_to_block(text, cur) == "def main():\n    print(os.getcwd())\n\n"
    imports = "import sys\nimport json\n\nclass A:\n    pass"
    assert limit_to_block(imports, at("import os\n█\n")) == "import sys\nimport json\n"
