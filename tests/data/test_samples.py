"""FIM, repository-level and SFT samples: exact layouts, decoding back to the original file, syntactic middles."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mellum.data.samples import (
    SampleBuilder, SampleConfig, SegmentEncoder, encode_sample, fim_split, parse_fim, path_distance, render_segments,
    repo_context, syntactic_spans,
)
from mellum.prompt import FORMATS, ContextFile, get_format

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_fim_split_rebuilds_text():
    rng = np.random.default_rng(0)
    for text in ["", "a", "def f():\n    return 1\n", "ünïcödé → ✓\n" * 5]:
        for _ in range(50):
            s = fim_split(text, rng)
            assert s.prefix + s.middle + s.suffix == text


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_segments_render_exactly_like_the_prompt_format(name):
    fmt = FORMATS[name]
    context = [ContextFile("pkg/a.py", "A = 1\n"), ContextFile("pkg/b.py", "B = {path}\n")]
    args = ("pkg/c.py", "def f(x):\n    return ", "\n\nprint(f(2))\n", context, "myrepo")
    assert "".join(s for _, s in render_segments(fmt, *args)) == fmt.render(*args)


def test_segment_encoding_matches_serving_and_keeps_special_strings_as_text(tiny_tokenizer):
    enc = SegmentEncoder(tiny_tokenizer)
    fmt = get_format("mellum")
    args = ("pkg/c.py", "def f(x):\n    return ", "\n\nprint(f(2))\n", [ContextFile("pkg/a.py", "A = 1\n")], "myrepo")
    # What serving does: render the prompt string and encode it with special tokens allowed.
    assert enc.encode(render_segments(fmt, *args)) == tiny_tokenizer.encode(fmt.render(*args), allow_special=True)
    # Code that mentions control tokens: they must stay text, only the template's tokens are special.
    tricky = ("x.py", 'S = "<fim_prefix><|endoftext|>"\n', "", [], None)
    ids = enc.encode(render_segments(fmt, *tricky))
    specials = [i for i in ids if i in tiny_tokenizer.special_ids]
    assert specials == [tiny_tokenizer.id_of(t) for t in ("<filename>", "<fim_suffix>", "<fim_prefix>", "<fim_middle>")]
    assert tiny_tokenizer.decode(ids) == fmt.render(*tricky)
    with pytest.raises(ValueError, match="qwen2.5-coder.*<\\|fim_prefix\\|>"):
        enc.check_format(get_format("qwen2.5-coder"))


def test_every_fim_sample_decodes_back_to_the_file(tiny_tokenizer):
    enc = SegmentEncoder(tiny_tokenizer)
    builder = SampleBuilder(SampleConfig(fim_rate=1.0, spm_rate=0.5))
    text = (STDLIB / "textwrap.py").read_text()  # a real file
    rng = np.random.default_rng(1)
    orders = set()
    for _ in range(60):
        sample = builder.pretrain("textwrap.py", text, rng)
        ids, mask = encode_sample(enc, sample)
        # The mask marks the middle (used by SFT; pre-training shards train on every token).
        assert tiny_tokenizer.decode(ids[mask.index(1) :]) == sample.fim.middle + "<|endoftext|>"
        decoded = tiny_tokenizer.decode(ids)
        fmt = builder.spm if sample.kind == "fim-spm" else builder.psm
        parsed = parse_fim(decoded, fmt)
        assert parsed == sample.fim and parsed.prefix + parsed.middle + parsed.suffix == text
        assert ids[-1] == tiny_tokenizer.eos_id
        orders.add(sample.kind)
    assert orders == {"fim-spm", "fim-psm"}


def test_spm_layout_golden(tiny_tokenizer):
    builder = SampleBuilder(SampleConfig(fim_rate=1.0, spm_rate=1.0))
    sample = builder.pretrain("a.py", "abcdef", np.random.default_rng(3))
    s = sample.fim
    assert "".join(x for _, x in sample.segments) == (
        f"<filename>a.py\n<fim_suffix>{s.suffix}<fim_prefix>{s.prefix}<fim_middle>{s.middle}<|endoftext|>"
    )


def test_path_distance_and_repo_context_order():
    assert path_distance("a/b/x.py", "a/b/y.py") == 0
    assert path_distance("a/b/x.py", "a/y.py") == 1
    assert path_distance("a/b/x.py", "c/y.py") == 3
    files = [("pkg/core/target.py", "T" * 10), ("pkg/core/near.py", "N" * 10), ("pkg/util.py", "U" * 10),
             ("docs/far/away.py", "F" * 10), ("pkg/core/huge.py", "H" * 1000)]
    ctx = repo_context("pkg/core/target.py", files, budget_chars=100, max_files=8)
    # Nearest last; the file over budget is skipped; the target itself is never context.
    assert [c.path for c in ctx] == ["docs/far/away.py", "pkg/util.py", "pkg/core/near.py"]
    assert [c.path for c in repo_context("pkg/core/target.py", files, 100, max_files=2)] == ["pkg/util.py", "pkg/core/near.py"]


def test_repository_sample_layout():
    builder = SampleBuilder(SampleConfig(fim_rate=0.0, repo_rate=1.0))
    files = [("pkg/b.py", "B = 2\n"), ("pkg/a.py", "A = 1\n"), ("other/c.py", "C = 3\n")]
    sample = builder.pretrain("pkg/b.py", "B = 2\n", np.random.default_rng(0), files, repo="proj")
    assert sample.kind == "repo"
    assert "".join(x for _, x in sample.segments) == (
        "<reponame>proj\n<filename>other/c.py\nC = 3\n<filename>pkg/a.py\nA = 1\n<filename>pkg/b.py\nB = 2\n<|endoftext|>"
    )
    fim = SampleBuilder(SampleConfig(fim_rate=1.0, repo_rate=1.0)).pretrain("pkg/b.py", "B = 2\n", np.random.default_rng(0), files, "proj")
    text = "".join(x for _, x in fim.segments)
    assert fim.kind == "repo-fim-spm" and text.startswith("<reponame>proj\n<filename>other/c.py\nC = 3\n<filename>pkg/a.py\nA = 1\n<filename>pkg/b.py\n<fim_suffix>")


SNIPPET = "def f(x):\n    if x:\n        return 1\n    return 2\n\n\nclass K:\n    def g(self):\n        return [i for i in range(3)]\n"


def test_syntactic_spans_are_blocks_and_statements():
    spans = {SNIPPET[a:b] for a, b in syntactic_spans(SNIPPET, "python")}
    assert "if x:\n        return 1\n    return 2" in spans  # the body of f
    assert "return 1" in spans and "return 2" in spans
    assert "return [i for i in range(3)]" in spans
    assert all(len(s) <= 20 for s in (SNIPPET[a:b] for a, b in syntactic_spans(SNIPPET, "python", max_chars=20)))
    assert syntactic_spans("x = 1\n", "cobol") == []
    go = "package main\n\nfunc add(a int, b int) int {\n\treturn a + b\n}\n"
    assert "{\n\treturn a + b\n}" in {go[a:b] for a, b in syntactic_spans(go, "go")}
    js = "function add(a, b) {\n  return a + b;\n}\n"
    assert "return a + b;" in {js[a:b] for a, b in syntactic_spans(js, "javascript")}
    uni = "def é():\n    return 'ü→✓'\n"
    assert "return 'ü→✓'" in {uni[a:b] for a, b in syntactic_spans(uni, "python")}  # byte → character offsets


def test_sft_sample_masks_the_prompt(tiny_tokenizer):
    enc = SegmentEncoder(tiny_tokenizer)
    builder = SampleBuilder(SampleConfig())
    files = [("pkg/k.py", SNIPPET), ("pkg/util.py", "HELPER = 1\n")]
    rng = np.random.default_rng(0)
    for _ in range(20):
        sample = builder.sft("pkg/k.py", SNIPPET, "python", rng, files, repo="proj")
        assert sample.fim.text == SNIPPET and 0 < len(sample.fim.middle) <= 700
        ids, mask = encode_sample(enc, sample)
        start = mask.index(1)
        assert all(m == 0 for m in mask[:start]) and all(m == 1 for m in mask[start:])
        assert tiny_tokenizer.decode(ids[start:]) == sample.fim.middle + "<|endoftext|>"
        assert tiny_tokenizer.decode(ids[:start]).startswith("<reponame>proj\n<filename>pkg/util.py\nHELPER = 1\n<filename>pkg/k.py\n")
    assert builder.sft("x.txt", "hello", "text", rng) is None
