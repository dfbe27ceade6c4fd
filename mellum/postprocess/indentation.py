"""Indentation normalised to the file: no doubled indent on the first line, tabs or spaces as the file uses."""

from __future__ import annotations

from mellum.postprocess.cursor import Cursor, indent_width, leading_whitespace, opens_block


def normalize_indentation(text: str, cursor: Cursor) -> str:
    """Fix the two indentation mistakes completions make (Tabby's `normalizeIndentation`, REFERENCE.md §3).

    1. The cursor already sits in the line's indentation and the model indents its first line again:
       keep only the part of the model's indent still missing to reach the expected level (one unit deeper
       after a line that opens a block, the previous line's level otherwise).
    2. The file indents with tabs and the model with spaces, or the other way round: convert leading
       whitespace of every line the completion starts.
    """
    if not text:
        return text
    lines = text.split("\n")
    unit = cursor.indent_unit
    unit_cols = cursor.tab_size if unit == "\t" else len(unit)
    lp = cursor.line_prefix
    if lp and not lp.strip() and lines[0][:1] in (" ", "\t"):
        prev = cursor.previous_line
        expected = indent_width(prev, cursor.tab_size)
        if opens_block(prev, cursor.line_comment):
            expected += unit_cols
        have = indent_width(lp, cursor.tab_size)
        extra = indent_width(lines[0], cursor.tab_size)
        keep = max(0, min(extra, expected - have))
        lines[0] = _indent(keep, cursor) + lines[0].lstrip(" \t")
    # Lines after the first start at column 0; the first one only when the cursor is at column 0.
    start = 0 if not lp else 1
    for i in range(start, len(lines)):
        ws = leading_whitespace(lines[i])
        wrong = " " if cursor.uses_tabs else "\t"
        if wrong in ws:
            lines[i] = _indent(indent_width(ws, cursor.tab_size if cursor.uses_tabs else unit_cols), cursor) + lines[i][len(ws):]
    return "\n".join(lines)


def _indent(columns: int, cursor: Cursor) -> str:
    if cursor.uses_tabs:
        return "\t" * (columns // cursor.tab_size) + " " * (columns % cursor.tab_size)
    return " " * columns
