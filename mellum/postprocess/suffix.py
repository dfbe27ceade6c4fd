"""Text the suffix already has is dropped: closing brackets after the cursor, lines that follow it."""

from __future__ import annotations

from mellum.postprocess.brackets import PAIRS, BracketState, scan
from mellum.postprocess.cursor import TRAILING_PUNCTUATION, Cursor


def drop_suffix_overlap(text: str, cursor: Cursor, min_text_overlap: int = 6) -> str:
    """Remove what would appear twice once the completion is inserted.

    - Lines: when the cursor's line ends at the cursor, a completion line equal (indentation included) to the
      suffix's next non-blank line means the model started rewriting the suffix: cut before it.
    - Characters: the completion's end overlapping the start of the rest of the cursor's line (`foo(a█)`
      completed as `b)`). Closing brackets are dropped only when keeping them would close more brackets than
      the prefix opened (or end the line inside a string); quotes and separators always; other text when the
      overlap is `min_text_overlap` characters or longer. A completion that still over-closes (it closed the bracket
      the rest of the line closes, then went on) ends before its first closer of a bracket the prefix opened.
    """
    if not text:
        return text
    rest = cursor.line_suffix
    if not rest.strip():
        target = cursor.next_suffix_line.rstrip()
        lines = text.split("\n")
        # The first line continues the cursor's line: compare it whole, and only when it starts the line.
        absolute = [cursor.line_prefix + lines[0] if not cursor.line_prefix.strip() else None] + lines[1:]
        for i, line in enumerate(absolute):
            if target and line is not None and line.rstrip() == target:
                return "\n".join(lines[:i])
        return text

    head = rest.lstrip(" \t")
    body = text.rstrip(" \t")
    for k in range(min(len(body), len(head)), 0, -1):
        overlap = head[:k]
        if not body.endswith(overlap):
            continue
        trimmed = body[:-k]
        if not overlap.strip(TRAILING_PUNCTUATION + " \t"):
            has_brackets = any(ch in PAIRS for ch in overlap)
            if has_brackets and (not _overcloses(cursor, body) or _overcloses(cursor, trimmed)):
                continue
            return trimmed
        if k >= min_text_overlap:
            return trimmed
    # The completion closes the bracket whose closer the line already has, then goes on (`def f(x:█)` completed as
    # ` int) -> int:`): no overlap to drop, and kept it leaves the suffix's `)` dangling. End it before that closer.
    if _overcloses(cursor, body):
        _, at = scan(body, BracketState(quote=cursor.prefix_brackets.quote), cursor.line_comment)
        if at is not None:
            return drop_suffix_overlap(body[:at].rstrip(" \t"), cursor, min_text_overlap)
    return text


def _overcloses(cursor: Cursor, completion: str) -> bool:
    """Whether prefix + completion + the rest of the line closes a bracket nobody opened, or ends the line inside a
    one-line string: a doubled closing quote (`print("a█")` completed as `b")`) opens a string that hides the
    brackets after it from the count."""
    state, underflow = scan(completion + cursor.line_suffix, cursor.prefix_brackets, cursor.line_comment)
    return underflow is not None or (state.quote is not None and len(state.quote) == 1 and state.quote != "`")
