"""Degenerate loops removed: a line or block of lines repeated back to back is kept once."""

from __future__ import annotations

from mellum.postprocess.cursor import Cursor


def drop_repetition(
    text: str, cursor: Cursor, max_block_lines: int = 8, min_line_chars: int = 4, single_line_copies: int = 3
) -> str:
    """Cut at the first block of 2..`max_block_lines` lines that the next lines repeat exactly, or at the first
    line repeated `single_line_copies` times in a row (two identical lines are common in real code).

    Only blocks with a line of at least `min_line_chars` letters or digits count, so runs of `}` or blank lines
    are left alone. Lines compare with trailing whitespace ignored.
    """
    lines = text.split("\n")
    # The first line continues the cursor's line: compare it as the whole line.
    norm = [line.rstrip() for line in [cursor.line_prefix + lines[0]] + lines[1:]]
    n = len(norm)
    best: int | None = None
    for start in range(n):
        if best is not None and start >= best:
            break
        for k in range(1, max_block_lines + 1):
            copies = single_line_copies if k == 1 else 2
            end = start + k * copies
            if end > n or (best is not None and start + k >= best):
                break
            block = norm[start : start + k]
            if not any(sum(c.isalnum() for c in line) >= min_line_chars for line in block):
                continue
            if all(norm[start + j * k : start + (j + 1) * k] == block for j in range(1, copies)):
                best = start + k
                break
    if best is None:
        return text
    return "\n".join(lines[:best])
