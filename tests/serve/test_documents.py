"""LSP positions in UTF-16 code units, clamping of bad positions, incremental sync."""

from __future__ import annotations

import random

import pytest

from mellum.serve.documents import DocumentStore, line_starts, offset_at, position_at, scrub, uri_to_path

TEXT = "def f():\n    return '😀x'\r\nlast\rline"


def test_line_starts_handles_all_line_breaks():
    assert line_starts(TEXT) == [0, 9, 26, 31]
    assert line_starts("") == [0]
    assert line_starts("a\n") == [0, 2]


@pytest.mark.parametrize(
    "line, character, expected",
    [
        (0, 0, 0),
        (0, 3, 3),
        (1, 12, 9 + 12),  # just before the emoji
        (1, 13, 9 + 12),  # inside the surrogate pair: snapped to the emoji's start
        (1, 14, 9 + 13),  # after the emoji (2 UTF-16 units, 1 code point)
        (1, 15, 9 + 14),  # after 'x'
        (1, 999, 9 + 15),  # past the end of the line: end of line, before \r\n
        (2, 2, 28),
        (3, 4, 35),
        (9, 0, len(TEXT)),  # past the last line: end of document
        (-1, 5, 0),
        (0, -3, 0),
    ],
)
def test_offset_at(line, character, expected):
    assert offset_at(TEXT, line, character) == expected


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8", "utf-32"])
def test_position_round_trip(encoding):
    rng = random.Random(0)
    text = "".join(rng.choice("ab \n😀é\r") for _ in range(300))
    starts = line_starts(text)
    for offset in range(len(text) + 1):
        if offset and text[offset - 1] == "\r" and text[offset : offset + 1] == "\n":
            continue  # between \r and \n is not a position
        line, character = position_at(text, offset, starts, encoding)
        assert offset_at(text, line, character, starts, encoding) == offset


def test_utf8_positions_count_bytes():
    assert offset_at("é😀x", 0, 2, encoding="utf-8") == 1  # é is 2 bytes
    assert offset_at("é😀x", 0, 4, encoding="utf-8") == 1  # inside the emoji's 4 bytes: snapped back
    assert offset_at("é😀x", 0, 6, encoding="utf-8") == 2
    assert offset_at("é😀x", 0, 2, encoding="utf-32") == 2


def test_incremental_changes_match_full_text():
    store = DocumentStore()
    uri = "file:///tmp/x.py"
    store.open(uri, "import os\n\nprint(😀)\n", version=1)
    store.change(uri, [("sys", (0, 7, 0, 9))], version=2)  # replace "os"
    # Changes apply in order: the second range is in the text after the first insertion. 😀 is 2 units wide.
    store.change(uri, [("x = 1\n", (1, 0, 1, 0)), ("'", (3, 6, 3, 8))], version=3)
    doc = store.get(uri)
    assert doc.text == "import sys\nx = 1\n\nprint(')\n"
    assert doc.version == 3
    # Reversed and out-of-range ranges do not raise.
    store.change(uri, [("", (99, 0, 0, 0))], version=4)
    assert store.get(uri).text == ""
    store.change(uri, [("whole", None)], version=5)
    assert store.get(uri).text == "whole"


def test_lone_surrogates_are_scrubbed_one_for_one():
    store = DocumentStore()
    doc = store.open("file:///x.py", "a\ud800b")
    assert doc.text == "a\ufffdb" and doc.text.encode("utf-8")
    store.change("file:///x.py", [("\udc00", (0, 1, 0, 1))], version=2)
    assert store.get("file:///x.py").text == "a\ufffd\ufffdb"
    assert scrub("fine 😀") == "fine 😀"


def test_store_snapshot_and_close():
    store = DocumentStore()
    store.open("file:///w/a%20b.py", "A")
    store.open("untitled:Untitled-1", "B")
    assert store.snapshot() == {"/w/a b.py": "A", "Untitled-1": "B"}
    store.close("untitled:Untitled-1")
    assert len(store) == 1
    assert uri_to_path("file:///w/a%20b.py") == "/w/a b.py"


def test_a_buffer_never_opened_takes_only_whole_text_changes():
    store = DocumentStore()
    # A range edit has no text to point into: applied to "" it would make a buffer unlike the editor's.
    assert store.change("file:///new.py", [("x", (3, 0, 3, 0))], version=2) is None
    assert store.get("file:///new.py") is None
    doc = store.change("file:///new.py", [("import os\n", None), ("sys", (0, 7, 0, 9))], version=3)
    assert doc.text == "import sys\n" and doc.version == 3
