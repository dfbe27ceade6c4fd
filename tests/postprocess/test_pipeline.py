from mellum.postprocess import Pipeline, limit_lines, pipeline


def test_mid_line_completion(at):
    cur = at("value = compute(█)\n")
    assert pipeline()("items, key)\nprint(value)", cur) == "items, key"


def test_block_completion_after_def(at):
    cur = at("import math\n\ndef area(r):█\n\nprint(area(2))\n")
    raw = "\n    return math.pi * r * r\n\n\ndef perimeter(r):\n    return 2 * math.pi * r\n"
    assert pipeline()(raw, cur) == "\n    return math.pi * r * r"


def test_braces_with_auto_closed_suffix(at):
    cur = at("function f(x) {\n  █\n}\n", path="a.js")
    raw = "  if (x) {\n    return 1;\n  }\n  return 0;\n}\nfunction g() {"
    assert pipeline()(raw, cur) == "if (x) {\n    return 1;\n  }\n  return 0;"


def test_repetition_then_suffix(at):
    cur = at("for x in xs:\n    █\nprint('done')\n")
    raw = "total += x\n    count += 1\n    total += x\n    count += 1\n    total"
    assert pipeline()(raw, cur) == "total += x\n    count += 1"


def test_custom_filter_list(at):
    p = pipeline([limit_lines, lambda text, cursor: text.upper()])
    assert isinstance(p, Pipeline)
    assert p("abc\ndef", at("x = █\n")) == "ABC"


def test_ended_signals_block_end(at):
    cur = at("def f(x):█\n")
    p = pipeline()
    assert not p.ended("\n    return x\n", cur)
    assert p.ended("\n    return x\n\ndef g():\n", cur)
    assert not p.ended("\n    return x\n\ndef g", cur)  # incomplete line: wait for it
