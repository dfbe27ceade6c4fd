from mellum.postprocess import drop_suffix_overlap


def test_auto_closed_bracket_dropped(at):
    assert drop_suffix_overlap("a, b)", at("foo(█)\n")) == "a, b"


def test_bracket_the_completion_needs_is_kept(at):
    # `print(foo(` with one `)` auto-inserted: `x)` closes foo(, the suffix's `)` closes print(.
    assert drop_suffix_overlap("x)", at("print(foo(█)\n")) == "x)"
    assert drop_suffix_overlap("x))", at("print(foo(█)\n")) == "x)"


def test_several_closers_and_separator(at):
    assert drop_suffix_overlap("[1, 2]);", at("f(█]);\n", path="a.js")) == "[1, 2"


def test_closing_quote_dropped(at):
    assert drop_suffix_overlap('world"', at('s = "hello █"\n')) == "world"


def test_short_text_overlap_is_not_dropped(at):
    assert drop_suffix_overlap("bar", at("foo█r = 1\n")) == "bar"


def test_long_text_overlap_is_dropped(at):
    assert drop_suffix_overlap("x = compute_total", at("█compute_total(items)\n")) == "x = "


def test_line_the_suffix_already_has(at):
    cur = at("def f(x):█\n    return x\n")
    assert drop_suffix_overlap("\n    y = x * 2\n    return x", cur) == "\n    y = x * 2"


def test_closing_line_already_in_suffix(at):
    cur = at("if (a) {█\n}\n", path="a.c")
    assert drop_suffix_overlap("\n    b();\n}", cur) == "\n    b();"


def test_inner_closer_at_other_indent_is_kept(at):
    cur = at("void f() {\n    █\n}\n", path="a.c")
    text = "if (a) {\n        b();\n    }"
    assert drop_suffix_overlap(text, cur) == text


def test_brackets_counted_near_the_cursor_only(at):
    # An unclosed bracket far above the cursor (outside the window) does not make the completion's `)` legal.
    far = "broken = (\n" + "x = 1\n" * 2000
    cur = at(far + "print(foo(█)\n")
    assert cur.prefix_brackets.stack == ["(", "("]
    assert drop_suffix_overlap("x))", cur) == "x)"


def test_first_line_repeating_the_next_line(at):
    cur = at("def f(x):\n    █\n    return x\n")
    assert drop_suffix_overlap("return x", cur) == ""
    assert drop_suffix_overlap("y = x\n    return x", cur) == "y = x"


def test_closing_quote_and_bracket_dropped_inside_a_string(at):
    # Auto-closed `")`: keeping the model's `")` would leave `")` after it, a new string hiding the extra `)`.
    assert drop_suffix_overlap('world")', at('print("hello █")\n')) == "world"
    assert drop_suffix_overlap("a')]", at("x = [f('█')]\n")) == "a"
    # Inserted before the suffix's `")`, this gives `print("hello world", end="")`.
    assert drop_suffix_overlap('world", end="")', at('print("hello █")\n')) == 'world", end="'


def test_completion_running_past_the_suffix_closer_ends_before_it(at):
    # `def f(x:█)` with the `)` auto-closed: the model writes the rest of the signature through its own `)`.
    # Kept, the suffix's `)` would dangle after it (`def f(x: int) -> int:)`); no overlap can be dropped.
    assert drop_suffix_overlap(" int) -> int:", at("def f(x:█)\n")) == " int"
    assert drop_suffix_overlap("a, b))", at("foo(█)\n")) == "a, b"  # one closer too many
    assert drop_suffix_overlap('hi") + str(x)', at('print("█")\n')) == "hi"  # through the closing quote too
    # Legal results stay: the suffix's `)]` closes what the completion leaves open.
    assert drop_suffix_overlap("a), g(b", at("x = [f(█)]\n")) == "a), g(b"
    assert drop_suffix_overlap("a, b).then(x", at("call(█);\n", path="a.js")) == "a, b).then(x"


def test_signature_completed_through_the_auto_closed_paren_end_to_end(at):
    from mellum.postprocess import pipeline

    cur = at("def f(x:█)\n")
    assert pipeline()(" int) -> int:\n    return x", cur) == " int"
