from mellum.postprocess import drop_inline_loop, drop_repetition


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


def test_unit_looping_to_the_end_of_the_line_kept_once(at):
    assert drop_inline_loop("conn.conn.conn.conn.conn.co", at("x = self.█")) == "conn."
    assert drop_inline_loop("get_header(conn.conn.conn.conn.conn", at("█")) == "get_header(conn."
    # In a multi-line completion only the last line (where generation stopped) is looked at.
    text = "value = load()\nreturn f(value, value, value, value, value, val"
    assert drop_inline_loop(text, at("█")) == "value = load()\nreturn f(value,"


def test_repeats_that_end_are_code_not_loops(at):
    for text in ("data = [0x00, 0x00, 0x00, 0x00, 0x00]",  # closed by other text
                 "# " + "=" * 40,  # no letters or digits in the unit
                 "x = (a, a, a)",  # too few copies
                 "conn.conn.conn.conn.conn.\nreturn conn"):  # the loop ended; the last line is fine
        assert drop_inline_loop(text, at("█")) == text
    # Before text on the cursor's line, the suffix may be what ended a one-line completion.
    assert drop_inline_loop("10, 10, 10, 10", at("sizes = [█]")) == "10, 10, 10, 10"
