"""Golden cases mark the cursor with █ inside the file's text."""

from __future__ import annotations

import pytest

from mellum.postprocess import Cursor

MARK = "█"


def make_cursor(marked: str, path: str = "example.py", multiline: bool | None = None) -> Cursor:
    assert marked.count(MARK) == 1, "mark the cursor exactly once"
    prefix, suffix = marked.split(MARK)
    return Cursor(prefix, suffix, path=path, multiline=multiline)


@pytest.fixture
def at():
    """`at("code█more")` → the Cursor at the mark."""
    return make_cursor
