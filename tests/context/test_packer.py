"""Context packer golden cases on the cursor-marked fixture project: ordering, budget to the token, trimming,
duplicates and cursor repeats dropped, forbidden files never packed, stable order between keystrokes."""

from __future__ import annotations

import gzip
import json

import pytest

from mellum.context import ContextConfig, ContextPacker, ProjectIndex, pack_chunks, trim_prefix, trim_suffix
from mellum.context import sources as src
from mellum.prompt import ContextFile, get_format

from .conftest import leaks

CONFIG = ContextConfig(max_file_bytes=20_000)


def _packer(shop, count, **changes):
    from dataclasses import replace

    config = replace(CONFIG, **changes)
    return ContextPacker(ProjectIndex(shop.root, config), count, config)


def _render(packer, path, result):
    return packer.format.render(path, result.prefix, result.suffix, result.pieces)


# ---- golden ordering ---------------------------------------------------------------------------
GOLDEN = {
    # budget → (path, first line) of each piece, least relevant first, most relevant last (nearest the cursor)
    400: [("app/models.py", 0), ("app/models.py", 13)],
    1200: [
        ("app/pricing.py", 12), ("app/__init__.py", 0), ("java/com/shop/Cart.java", 9), ("storage/db.py", 0),
        ("app/models.py", 22), ("app/pricing.py", 0), ("storage/db.py", 13), ("app/models.py", 0), ("app/models.py", 13),
    ],
}


@pytest.mark.parametrize("budget", sorted(GOLDEN))
def test_golden_pieces_most_relevant_last(shop, count, budget):
    packer = _packer(shop, count)
    path, prefix, suffix = shop.cursor()
    result = packer.pack(path, prefix, suffix, budget)
    assert [(p.path, p.start_line) for p in result.pieces] == GOLDEN[budget]
    scores = [p.score for p in result.pieces]
    assert scores == sorted(scores)
    rendered = _render(packer, path, result)
    # Mellum layout: context blocks, then the current file's name, then SPM with the cursor between prefix and middle.
    assert rendered.startswith("<filename>" + result.pieces[0].path + "\n")
    assert rendered.endswith(f"<filename>{path}\n<fim_suffix>{result.suffix}<fim_prefix>{result.prefix}<fim_middle>")
    assert rendered.index("<filename>app/models.py\n@dataclass\nclass Order") < rendered.index(f"<filename>{path}")


# ---- budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mellum", "qwen2.5-coder", "starcoder2", "plain"])
@pytest.mark.parametrize("budget", [60, 150, 333, 700, 1500, 4000])
def test_budget_respected_to_the_token(shop, count, fmt, budget):
    packer = _packer(shop, count, prompt_format=fmt)
    path, prefix, suffix = shop.cursor()
    result = packer.pack(path, prefix, suffix, budget)
    assert count(_render(packer, path, result)) == result.tokens_used <= budget
    form = get_format(fmt)
    for piece in result.pieces:
        assert piece.tokens == count(form.render_context([piece]))
    assert result.context_tokens == sum(p.tokens for p in result.pieces)
    if fmt == "mellum":  # special tokens separate every part: counts add up exactly, so little is wasted
        overhead = count(form.render(path, "", "", []))
        assert result.tokens_used == overhead + result.prefix_tokens + result.suffix_tokens + result.context_tokens
    if budget >= 1500:
        assert result.prefix == prefix and (result.suffix == suffix or fmt == "plain")
    if fmt == "plain":
        assert result.suffix == ""


def test_budget_smaller_than_the_fixed_parts_is_a_clear_error(shop, count):
    packer = _packer(shop, count)
    with pytest.raises(ValueError, match="too small"):
        packer.pack("app/checkout.py", "x = 1\n", "", budget_tokens=3)


def test_default_budget_is_window_minus_new_tokens(shop, count):
    packer = _packer(shop, count, window_tokens=700, max_new_tokens=100)
    path, prefix, suffix = shop.cursor()
    result = packer.pack(path, prefix, suffix)
    assert result.budget == 600 and result.tokens_used <= 600


# ---- trimming ----------------------------------------------------------------------------------
def test_trim_prefix_from_top_and_suffix_from_bottom_by_whole_lines(count):
    text = "".join(f"line_{i} = compute({i}, {i + 1})\n" for i in range(200))
    for cap in (1, 7, 30, 100, 400):
        head, n = trim_prefix(text + "    partial = ", cap, count)
        assert (text + "    partial = ").endswith(head) and n == count(head) <= cap
        rest = (text + "    partial = ")[: -len(head) or None]
        if head and rest:
            assert rest.endswith("\n") or len(head) < len("    partial = ")  # cut at a line start
            above = rest[: -1].rsplit("\n", 1)[-1] + "\n"
            assert count(above + head) > cap  # maximal: one more line would not fit
        tail, n = trim_suffix("\n" + text, cap, count)
        assert ("\n" + text).startswith(tail) and n == count(tail) <= cap
        if cap >= 30:
            assert tail.endswith("\n")
    long_line = "x" * 5000
    piece, n = trim_prefix("a = 1\n" + long_line, 20, count)
    assert long_line.endswith(piece) and 0 < n <= 20  # the cursor line alone is too long: characters nearest it


def test_prefix_and_suffix_keep_their_share(shop, count):
    packer = _packer(shop, count, prefix_share=0.5, suffix_share=0.2)
    path, prefix, suffix = shop.cursor()
    long_prefix = "".join(f"# filler line {i} apply_discount customer order total\n" for i in range(400)) + prefix
    long_suffix = suffix + "".join(f"# trailing line {i} save_order\n" for i in range(400))
    result = packer.pack(path, long_prefix, long_suffix, 1000)
    assert result.pieces  # context got some room...
    assert result.prefix_tokens >= trim_prefix(long_prefix, 500, count)[1]  # ...but not the prefix's share
    assert result.suffix_tokens >= trim_suffix(long_suffix, 200, count)[1]
    assert long_prefix.endswith(result.prefix) and long_suffix.startswith(result.suffix)
    assert result.prefix.startswith("# filler") and result.tokens_used <= 1000


def test_unused_context_room_goes_back_to_the_prefix(tmp_path, count):
    (tmp_path / "main.py").write_text("x = 1\n")
    config = ContextConfig(prefix_share=0.2, suffix_share=0.1)
    packer = ContextPacker(ProjectIndex(tmp_path, config), count, config)
    prefix = "".join(f"value_{i} = {i}\n" for i in range(300))
    result = packer.pack("main.py", prefix, "", 800)
    assert not result.pieces
    assert result.prefix_tokens > 0.2 * 800 and result.tokens_used > 760  # nearly all the budget used



@pytest.mark.parametrize("fmt", ["mellum", "qwen2.5-coder", "plain"])
def test_special_token_strings_in_code_counted_as_the_prompt_encodes_them(tmp_path, tiny_tokenizer, fmt):
    # Only the templates' control tokens are tokens; `<fim_prefix>` in code is its characters (encode_segments).
    marks = '"<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<filename>", "<|fim_prefix|>", "<|file_sep|>"'
    (tmp_path / "tokens.py").write_text("".join(f"SPECIAL_{i} = ({marks})\n" for i in range(80)))
    (tmp_path / "main.py").write_text("x = 1\n")
    config = ContextConfig(prompt_format=fmt)
    packer = ContextPacker.for_tokenizer(ProjectIndex(tmp_path, config), tiny_tokenizer, config)
    prefix = "".join(f"seen_{i} = ({marks})\n" for i in range(40)) + "from tokens import SPECIAL_1\nend = SPECIAL_"
    suffix = "".join(f"after_{i} = ({marks})\n" for i in range(40))
    result = packer.pack("main.py", prefix, suffix, 3000)
    # Encoded as the completion service does: the prefix on its own (`PromptFormat.around_prefix`).
    before, after = packer.format.around_prefix("main.py", result.suffix, result.pieces)
    encoded = (tiny_tokenizer.encode_segments(before) + tiny_tokenizer.encode(result.prefix)
               + tiny_tokenizer.encode_segments(after))
    assert result.pieces and len(result.prefix) < len(prefix)  # context and trimming both at work
    assert result.tokens_used == len(encoded) <= 3000
    for piece in result.pieces:
        assert piece.tokens == len(tiny_tokenizer.encode_segments(packer.format.context_segments([piece])))
    assert packer._additive == (fmt == "mellum")  # the shortcut survives where control tokens bound every part
    given = pack_chunks(result.pieces, tiny_tokenizer.count, 10_000, prompt_format=fmt,
                        count_segments=lambda segs: len(tiny_tokenizer.encode_segments(segs)))
    assert sorted(p.tokens for p in given) == sorted(p.tokens for p in result.pieces)


def test_plain_prompt_counted_with_the_prefix_on_its_own(tmp_path, tiny_tokenizer):
    # "plain" has no control token between the file header and the prefix: joined, "...\n" and the prefix's leading
    # spaces merge into other tokens than the service, which encodes the prefix alone, produces.
    (tmp_path / "main.py").write_text("x = 1\n")
    config = ContextConfig(prompt_format="plain")
    packer = ContextPacker.for_tokenizer(ProjectIndex(tmp_path, config), tiny_tokenizer, config)
    for prefix in ["    return value\n", "\n\n    def f(self):\n        ", " x", "\t\tpass"]:
        result = packer.pack("main.py", prefix, "", 500)
        before, after = packer.format.around_prefix("main.py", "", result.pieces)
        encoded = (tiny_tokenizer.encode_segments(before) + tiny_tokenizer.encode(result.prefix)
                   + tiny_tokenizer.encode_segments(after))
        assert result.tokens_used == len(encoded), prefix


# ---- what never gets in ------------------------------------------------------------------------
def test_forbidden_files_never_packed_even_when_offered(shop, count):
    packer = _packer(shop, count)
    path, prefix, suffix = shop.cursor()
    open_files = {
        ".env": "API_KEY=LEAK_BUFFER apply_discount",
        "app/stolen.py": "def apply_discount(): pass  # LEAK_SYMLINK_BUFFER",
        str(shop.outside / "stolen.py"): "def apply_discount(): pass  # LEAK_OUTSIDE_BUFFER",
        "build/x.py": "def apply_discount(): pass  # LEAK_IGNORED_BUFFER",
    }
    extra = [ContextFile("id_rsa", "LEAK_EXTRA"), ContextFile("notes.py", "k = '-----BEGIN EC PRIVATE KEY-----' LEAK")]
    result = packer.pack(path, prefix, suffix, 6000, open_files=open_files, extra=extra)
    rendered = _render(packer, path, result)
    assert result.pieces and leaks(rendered) == []
    assert "-----BEGIN" not in rendered


def test_near_duplicates_dropped(shop, count):
    packer = _packer(shop, count)
    path, prefix, suffix = shop.cursor()
    ranked = packer.rank(src.Query.build(path, "python", prefix, suffix, [], packer.config))
    paths = [(c.path, c.start_line) for c in ranked]
    assert ("app/pricing.py", 0) in paths and ("app/legacy_pricing.py", 0) in paths  # both retrieved...
    result = packer.pack(path, prefix, suffix, 6000)
    packed = [(p.path, p.start_line) for p in result.pieces]
    assert ("app/pricing.py", 0) in packed and ("app/legacy_pricing.py", 0) not in packed  # ...one packed
    texts = [p.text for p in result.pieces]
    assert len(texts) == len(set(texts))


def test_chunks_repeating_the_cursor_window_dropped(shop, count):
    path, prefix, suffix = shop.cursor()
    window = prefix[prefix.index("def checkout"):] + suffix[: suffix.index("def refund")]
    (shop.root / "app" / "checkout_old.py").write_text("from app import pricing\n\n\n" + window.replace("    \n", ""))
    packer = _packer(shop, count)
    query = src.Query.build(path, "python", prefix, suffix, [], packer.config)
    top = src.bm25_chunks(packer.index, query, top_k=1)[0][0]
    assert packer.index.chunks[top].path == "app/checkout_old.py"  # lexically the closest chunk of all...
    assert "app/checkout_old.py" in [c.path for c in packer.rank(query)]
    result = packer.pack(path, prefix, suffix, 6000)
    assert all("Order(customer=customer, items=items)" not in p.text for p in result.pieces)  # ...and dropped


# ---- editor state ------------------------------------------------------------------------------
def test_open_buffers_override_disk_and_extra_is_most_relevant(shop, count):
    packer = _packer(shop, count)
    path, prefix, suffix = shop.cursor()
    buffer = (shop.root / "storage" / "db.py").read_text().replace("def save_order", "def save_order_v2  # UNSAVED_EDIT\ndef save_order")
    extra = [ContextFile("clipboard.py", "discounted = round(discounted, 2)\n")]
    result = packer.pack(path, prefix, suffix, 2000, open_files={"storage/db.py": buffer}, extra=extra)
    assert any("UNSAVED_EDIT" in p.text for p in result.pieces)
    assert result.pieces[-1].path == "clipboard.py" and result.pieces[-1].sources == ("extra",)


def test_order_stable_between_keystrokes(shop, count):
    packer = _packer(shop, count)
    path, prefix, suffix = shop.cursor()
    first = packer.pack(path, prefix, suffix, 1200)
    keys = []
    for typed in ("t", "ta", "tax", "taxed = pricing.with_tax(discounted)\n    "):
        result = packer.pack(path, prefix + typed, suffix, 1200)
        keys.append([(p.path, p.start_line) for p in result.pieces])
        before = [(p.path, p.start_line) for p in first.pieces]
        kept = [k for k in keys[-1] if k in before]
        assert keys[-1][: len(kept)] == [k for k in before if k in kept]  # pieces seen before keep their places, first
    assert keys[0] == [(p.path, p.start_line) for p in first.pieces]  # one keystroke: the same context
    unstable = _packer(shop, count, stable_order=False)
    unstable.pack(path, prefix, suffix, 1200)
    assert [p.score for p in unstable.pack(path, prefix + "tax", suffix, 1200).pieces] == sorted(
        p.score for p in unstable.pack(path, prefix + "tax", suffix, 1200).pieces
    )


def test_sources_are_configurable(shop, count):
    packer = _packer(shop, count, sources=("path",))
    path, prefix, suffix = shop.cursor()
    result = packer.pack(path, prefix, suffix, 1500)
    assert result.pieces and all(p.sources == ("path",) for p in result.pieces)
    assert result.pieces[-1].path == "app/__init__.py"  # nearest file (same folder, first by name) last
    assert {p.path for p in result.pieces[-3:]} <= {"app/__init__.py", "app/legacy_pricing.py", "app/models.py", "app/pricing.py"}
    with pytest.raises(ValueError, match="unknown context sources"):
        ContextConfig(sources=("path", "telepathy"))


# ---- given chunks (CrossCodeEval) --------------------------------------------------------------
def test_pack_chunks_orders_dedups_and_respects_budget(count):
    chunks = [
        {"filename": "a.py", "retrieved_chunk": "def alpha():\n    return compute_alpha(1)\n", "score": 9.0},
        {"filename": "b.py", "retrieved_chunk": "def beta():\n    return compute_beta(2)\n", "score": 8.0},
        {"filename": "a_copy.py", "retrieved_chunk": "def alpha():\n    return compute_alpha(1)\n", "score": 7.0},
        {"filename": "cursor.py", "retrieved_chunk": "value = current_line(x)\nother = next_line(y)\n", "score": 6.0},
        {"filename": ".env", "retrieved_chunk": "TOKEN=LEAK\n", "score": 5.0},
        {"filename": "c.py", "retrieved_chunk": "def gamma():\n    return compute_gamma(3)\n", "score": 4.0},
    ]
    window = "value = current_line(x)\nother = next_line(y)\n"
    pieces = pack_chunks(chunks, count, budget=10_000, cursor_window=window)
    assert [p.path for p in pieces] == ["c.py", "b.py", "a.py"]  # best given first → packed last
    assert [p.score for p in pieces] == [4.0, 8.0, 9.0]
    fmt = get_format("mellum")
    one = count(fmt.render_context([ContextFile("a.py", chunks[0]["retrieved_chunk"])]))
    two = one + count(fmt.render_context([ContextFile("b.py", chunks[1]["retrieved_chunk"])]))
    assert [p.path for p in pack_chunks(chunks, count, budget=two, cursor_window=window)] == ["b.py", "a.py"]
    assert [p.path for p in pack_chunks(chunks, count, budget=one, cursor_window=window)] == ["a.py"]
    assert pack_chunks(chunks, count, budget=one - 1) == [] or sum(p.tokens for p in pack_chunks(chunks, count, budget=one - 1)) < one
    with pytest.raises(ValueError, match="needs 'filename'"):
        pack_chunks([{"text": "x"}], count, 100)


def test_pack_chunks_on_crosscodeeval(shared_benchmarks, count):
    path = shared_benchmarks / "crosscodeeval-subset" / "tabby_sample_python_bm25cfc_100.jsonl.gz"
    with gzip.open(path, "rt") as f:
        records = [json.loads(line) for _, line in zip(range(10), f)]
    fmt = get_format("mellum")
    for record in records:
        chunks = record["crossfile_context"]["list"]
        window = "\n".join(record["prompt"].splitlines()[-30:])
        for budget in (256, 1024):
            pieces = pack_chunks(chunks, count, budget, cursor_window=window)
            assert count(fmt.render_context(pieces)) <= budget
            given = [c["retrieved_chunk"] for c in chunks]
            order = [given.index(p.text) for p in pieces]
            assert order == sorted(order, reverse=True)  # most relevant (first given) last


def test_packer_without_index_packs_client_context_only(count):
    packer = ContextPacker(None, count, ContextConfig())
    prefix = "".join(f"total_{i} = price_{i} * quantity_{i}\n" for i in range(100))
    extra = [ContextFile("a.py", "def price(x):\n    return x\n"), ContextFile(".env", "SECRET=1\n")]
    result = packer.pack("/abs/cart.py", prefix, "\nprint(total_0)\n", 300, extra=extra)
    assert [p.path for p in result.pieces] == ["a.py"]
    assert result.tokens_used == count(_render(packer, "/abs/cart.py", result)) <= 300
    assert prefix.endswith(result.prefix) and result.prefix != prefix


def test_cursor_window_query():
    config = ContextConfig(cursor_window_lines=2, cursor_suffix_lines=1)
    q = src.Query.build("m.py", "python", "import os\nalpha = beta\ngamma = delta(", "epsilon)\nzeta = 1\n", [], config)
    assert q.window == "alpha = beta\ngamma = delta(epsilon)\n"
    assert q.near_idents == ["delta", "gamma", "beta", "alpha", "epsilon"]  # nearest first; 'zeta' outside


def test_trim_cuts_at_newlines_only(count):
    # `str.splitlines` also ends lines at U+2028 and form feeds: the "whole lines" kept began inside a line.
    prefix = "x = 1\ns = 'a\u2028b'\x0c\ny = "
    cap = count("b'\x0c\ny = ")
    head, n = trim_prefix(prefix, cap, count)
    assert head == "y = " and n == count("y = ")
    tail, _ = trim_suffix("\nq = 'c\u2028d'\nz = 2\n", count("\nq = 'c\u2028"), count)
    assert tail == "\n"


def test_files_changed_or_deleted_on_disk_after_indexing_never_reach_the_prompt(tmp_path, count):
    # A long-running server indexes a project once; edits made outside the editor (git checkout, rm) used to leave
    # the old text in its context for good.
    (tmp_path / "rates.py").write_text("def apply_discount(amount, rate):\n    return amount * (1 - rate)  # OLD_RATES\n")
    (tmp_path / "legacy.py").write_text("def apply_discount_legacy(amount, rate):\n    return amount  # OLD_LEGACY\n")
    (tmp_path / "main.py").write_text("x = 1\n")
    packer = ContextPacker(ProjectIndex(tmp_path, CONFIG), count, CONFIG)
    prefix = "from rates import apply_discount\nfrom legacy import apply_discount_legacy\n\ntotal = apply_discount("
    first = packer.pack("main.py", prefix, ")\n", 600)
    assert {"OLD_RATES", "OLD_LEGACY"} <= {m for p in first.pieces for m in ("OLD_RATES", "OLD_LEGACY") if m in p.text}
    (tmp_path / "rates.py").write_text("def apply_discount(amount, rate, floor=0):\n    return max(floor, amount)  # NEW_RATES\n")
    (tmp_path / "legacy.py").unlink()
    second = packer.pack("main.py", prefix, ")\n", 600)
    packed = "".join(p.text for p in second.pieces)
    assert "OLD_RATES" not in packed and "OLD_LEGACY" not in packed
    assert "NEW_RATES" in packed  # the new text is read and used in the same request
    assert "legacy.py" not in packer.index.files and packer.index.definitions_of("apply_discount_legacy") == []


def test_a_closed_unsaved_buffer_gives_way_to_the_disk(tmp_path, count):
    """An unsaved buffer stayed in the index after the editor closed it (buffers are trusted over the disk), so
    text that exists nowhere any more kept reaching prompts."""
    (tmp_path / "rates.py").write_text("def apply_discount(amount, rate):\n    return amount * (1 - rate)  # ON_DISK\n")
    (tmp_path / "main.py").write_text("x = 1\n")
    packer = ContextPacker(ProjectIndex(tmp_path, CONFIG), count, CONFIG)
    prefix = "from rates import apply_discount\n\ntotal = apply_discount("
    unsaved = "def apply_discount(amount, rate):\n    return 0  # UNSAVED_EDIT\n"

    def packed(open_files):
        return "".join(p.text for p in packer.pack("main.py", prefix, ")\n", 600, open_files=open_files).pieces)

    assert "UNSAVED_EDIT" in packed({"rates.py": unsaved, "main.py": prefix})  # the buffer wins while open
    assert "UNSAVED_EDIT" in packed({"rates.py": unsaved})
    after = packed({"main.py": prefix})  # rates.py closed without saving
    assert "UNSAVED_EDIT" not in after and "ON_DISK" in after
    assert "ON_DISK" in packed(None)
