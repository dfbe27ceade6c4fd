"""Trailing whitespace removed, keeping the line break a completion needs before text that follows the cursor."""

from __future__ import annotations

from mellum.postprocess.cursor import Cursor


def trim_trailing_whitespace(text: str, cursor: Cursor) -> str:
    """Strip trailing spaces and blank lines; a whitespace-only completion becomes empty.

    When text follows the cursor on its line and the completion ended its last line, the line breaks are
    kept (the completion inserted whole lines before that text); only the spaces after them go.
    """
    stripped = text.rstrip()
    if not stripped:
        return ""
    tail = text[len(stripped) :]
    if "\n" in tail and cursor.line_suffix.strip():
        return stripped + "\n" * tail.count("\n")
    return stripped
