"""Mid-line completions end where the model starts writing the text already after the cursor on that line."""

from __future__ import annotations

from mellum.postprocess.cursor import Cursor


def trim_at_line_suffix(text: str, cursor: Cursor, min_chars: int = 2) -> str:
    """Cut the first line at the first occurrence of the rest of the cursor's line (stripped).

    Completing `x = foo(█b)` as `a, b)` gives `a, `. A rest shorter than `min_chars` is only matched at the
    very end of the line, so a lone `x` after the cursor does not cut at every `x` the model writes.
    """
    if not cursor.mid_line:
        return text
    rest = cursor.line_suffix.strip()
    first, newline, tail = text.partition("\n")
    if len(rest) >= min_chars:
        at = first.find(rest)
    else:
        at = len(first.rstrip()) - len(rest) if first.rstrip().endswith(rest) else -1
    if at < 0:
        return text
    cut = first[:at]
    # The suffix keeps its own leading spaces: do not write them twice.
    lead = len(cursor.line_suffix) - len(cursor.line_suffix.lstrip(" \t"))
    if lead:
        cut = cut[: len(cut) - min(lead, len(cut) - len(cut.rstrip(" \t")))]
    return cut
