from mellum.postprocess import drop_repetition


def test_repeated_block_kept_once(at):
    text = "a = load(x)\nb = parse(a)\na = load(x)\nb = parse(a)\na = load("
    assert drop_repetition(text, at("█")) == "a = load(x)\nb = parse(a)"


def test_line_repeated_three_times_kept_once(at):
    text = "    total += item\n    total += item\n    total += item\n    total +="
    assert drop_repetition(text, at("█")) == "    total += item"


def test_two_identical_lines_are_fine(at):
    text = "x.append(1)\nx.append(1)\nreturn x"
    assert drop_repetition(text, at("█")) == text


def test_runs_of_closers_and_blank_lines_are_fine(at):
    text = "        }\n    }\n}\n}\n}\n\n\n\nnext()"
    assert drop_repetition(text, at("█")) == text


def test_trailing_whitespace_ignored(at):
    text = "print(value)  \nprint(value)\nprint(value) "
    assert drop_repetition(text, at("█")) == "print(value)  "
