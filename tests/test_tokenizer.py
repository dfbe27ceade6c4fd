"""Tokenizer: special ids, byte-exact round trips on real code, special strings in data stay text, HF loading."""

from __future__ import annotations

import pytest

from mellum.prompt import get_format
from mellum.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe
from tests.conftest import STDLIB


def test_special_tokens_take_the_first_ids(tiny_tokenizer):
    assert tiny_tokenizer.eos_id == 0
    assert [tiny_tokenizer.id_of(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tiny_tokenizer.vocab_size == 1024


def test_round_trip_is_byte_exact_on_real_files(tiny_tokenizer):
    for path in sorted((STDLIB / "email").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text, path


def test_round_trip_unicode_and_odd_whitespace(tiny_tokenizer):
    text = "s = 'héllo wörld ✓ 𝔘'\r\n\tif x:\n\t\t  return  \u00a0 1\n\n\n"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_special_strings_in_data_are_not_special(tiny_tokenizer):
    text = "marker = '<fim_prefix>' + '<|endoftext|>'"
    ids = tiny_tokenizer.encode(text)
    assert not set(ids) & tiny_tokenizer.special_ids
    assert tiny_tokenizer.decode(ids) == text
    prompt = get_format("mellum").render("a.py", "x", "y")
    special = tiny_tokenizer.encode(prompt, allow_special=True)
    assert special[0] == tiny_tokenizer.id_of("<filename>")
    assert tiny_tokenizer.id_of("<fim_middle>") == special[-1]


def test_saved_tokenizer_loads_in_ours_and_transformers(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    text = (STDLIB / "textwrap.py").read_text()
    assert again.encode(text) == tiny_tokenizer.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = get_format("mellum").render("a.py", "def f(", "):\n")
    assert hf.encode(prompt) == tiny_tokenizer.encode(prompt, allow_special=True)
    assert hf.eos_token_id == 0


def test_token_strings_cover_vocab(tiny_tokenizer):
    strings = tiny_tokenizer.token_strings
    assert len(strings) == tiny_tokenizer.vocab_size
    assert strings[tiny_tokenizer.id_of("<fim_prefix>")] == "<fim_prefix>"


def test_errors_are_clear(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must exceed"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="no token"):
        tiny_tokenizer.id_of("<nope>")


def test_encode_segments_keeps_special_strings_in_code_as_text(tiny_tokenizer):
    fmt = get_format("mellum")
    code = "SEP = '<fim_suffix>'\n"
    segments = fmt.segments("a.py", code, "<|endoftext|>\n", [])
    ids = tiny_tokenizer.encode_segments(segments)
    assert tiny_tokenizer.decode(ids) == fmt.render("a.py", code, "<|endoftext|>\n")
    controls = [i for i in ids if i in tiny_tokenizer.special_ids]
    names = ["<filename>", "<fim_suffix>", "<fim_prefix>", "<fim_middle>"]
    assert controls == [tiny_tokenizer.id_of(t) for t in names]
    # With no special strings in the code, segment encoding equals encoding the rendered prompt.
    plain = fmt.segments("a.py", "x = 1\n", "y = 2\n", [])
    assert tiny_tokenizer.encode_segments(plain) == tiny_tokenizer.encode(fmt.render("a.py", "x = 1\n", "y = 2\n"), allow_special=True)


def test_special_tokens_written_as_added_token_dicts_load(tiny_tokenizer, tmp_path):
    # transformers reads `"eos_token": {"__type": "AddedToken", "content": ...}` (older tokenizer_config.json files
    # hold it); eos_id raised a TypeError on it, so `mellum data shards` could not use such a tokenizer.
    import json

    tiny_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_id == 0 and loaded.config["eos_token"] == "<|endoftext|>"
