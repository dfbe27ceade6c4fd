"""Prompt formats: golden layouts for each family, and fields substituted exactly once."""

from __future__ import annotations

import pytest

from mellum.prompt import FORMATS, ContextFile, get_format

CONTEXT = [ContextFile("pkg/utils.py", "def helper():\n    return 1\n"), ContextFile("pkg/config.py", "X = {path}\n")]


def test_mellum_layout_matches_model_card():
    prompt = get_format("mellum").render("pkg/main.py", "def f():\n    re", "\nprint(f())\n", CONTEXT)
    assert prompt == (
        "<filename>pkg/utils.py\ndef helper():\n    return 1\n"
        "<filename>pkg/config.py\nX = {path}\n"
        "<filename>pkg/main.py\n"
        "<fim_suffix>\nprint(f())\n<fim_prefix>def f():\n    re<fim_middle>"
    )


def test_mellum_sdk_omits_newline_after_current_file_name():
    prompt = get_format("mellum-sdk").render("a.py", "x = ", "")
    assert prompt == "<filename>a.py<fim_suffix><fim_prefix>x = <fim_middle>"


def test_repo_header_only_when_repo_given():
    fmt = get_format("qwen2.5-coder")
    assert fmt.render("a.py", "p", "s", repo="demo").startswith("<|repo_name|>demo\n<|file_sep|>a.py\n")
    assert fmt.render("a.py", "p", "s").startswith("<|file_sep|>a.py\n<|fim_prefix|>p<|fim_suffix|>s<|fim_middle|>")


def test_braces_and_field_names_in_code_are_left_alone():
    text = "f'{prefix}' + '{suffix}' {text}"
    prompt = get_format("mellum").render("a.py", text, text)
    assert prompt.count("f'{prefix}' + '{suffix}' {text}") == 2


def test_orders_and_plain_format_drops_suffix():
    assert get_format("mellum").order == "spm"
    assert get_format("mellum-psm").order == "psm"
    plain = get_format("plain")
    assert plain.order == "plain"
    assert plain.render("a.py", "x = 1\n", "SUFFIX") == "# file: a.py\nx = 1\n"


def test_training_text_appends_eos_and_reconstructs_document():
    fmt = get_format("mellum")
    prompt, target = fmt.training_text("a.py", "ab", "cd", "ef")
    assert target == "cd<|endoftext|>"
    assert prompt.endswith("<fim_suffix>ef<fim_prefix>ab<fim_middle>")


def test_every_format_stops_on_its_eos():
    for fmt in FORMATS.values():
        assert fmt.eos in fmt.stop


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown prompt format 'nope'.*mellum"):
        get_format("nope")


def test_segments_join_to_render_and_mark_caller_text():
    fmt = get_format("mellum")
    segments = fmt.segments("pkg/main.py", "x = '<fim_middle>'", "\ny = 2\n", CONTEXT, repo="demo")
    assert "".join(s for _, s in segments) == fmt.render("pkg/main.py", "x = '<fim_middle>'", "\ny = 2\n", CONTEXT, repo="demo")
    assert ("text", "x = '<fim_middle>'") in segments
    assert all("<fim_middle>" not in s for kind, s in segments if kind == "literal" and s != "<fim_middle>")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_context_segments_join_to_render_context(name):
    fmt = get_format(name)
    files = [ContextFile("a.py", "END = '<|endoftext|>'\n"), ContextFile("b.py", "x = 1\n")]
    segments = fmt.context_segments(files)
    assert "".join(s for _, s in segments) == fmt.render_context(files)
    assert ("text", "END = '<|endoftext|>'\n") in segments  # code is caller text, never a literal
    assert fmt.segments("c.py", "", "", files)[: len(segments)] == segments  # the prompt's context part
