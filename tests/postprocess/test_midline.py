from mellum.postprocess import trim_at_line_suffix


def test_cuts_where_completion_reaches_line_suffix(at):
    assert trim_at_line_suffix("a, b)", at("x = foo(█b)\n")) == "a, "


def test_suffix_leading_space_not_written_twice(at):
    assert trim_at_line_suffix(" total + 1", at("x =█ + 1\n")) == " total"


def test_keeps_completion_without_the_rest(at):
    assert trim_at_line_suffix("value", at("x = foo(█, y)\n")) == "value"


def test_short_rest_matched_only_at_line_end(at):
    cur = at("name = █x\n")
    assert trim_at_line_suffix("max_x", cur) == "max_"  # ends with the rest
    assert trim_at_line_suffix("xs[0].y", cur) == "xs[0].y"  # an x inside is not the rest


def test_end_of_line_is_untouched(at):
    assert trim_at_line_suffix("a)\nb", at("foo(█)\n")) == "a)\nb"
