"""Single- vs multi-line: decide from the cursor position and cut single-line completions at the first newline."""

from __future__ import annotations

from mellum.postprocess.cursor import Cursor, opens_block


def is_multiline(cursor: Cursor) -> bool:
    """Multi-line on a blank line or at the end of a line that opens a block; single-line mid-line or after a
    finished statement (the rule Continue and Tabby use, REFERENCE.md §3). `cursor.multiline` overrides."""
    if cursor.multiline is not None:
        return cursor.multiline
    if cursor.mid_line:
        return False
    if not cursor.line_prefix.strip():
        return True
    return opens_block(cursor.line_prefix, cursor.line_comment)


def limit_lines(text: str, cursor: Cursor) -> str:
    """Keep only the first line of a single-line completion."""
    if is_multiline(cursor):
        return text
    return text.split("\n", 1)[0]
