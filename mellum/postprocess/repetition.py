"""Degenerate loops removed: a line or block of lines repeated back to back is kept once, and so is a short unit
repeated to the end of the completion within its last line (`conn.conn.conn.conn.co`)."""

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


def drop_inline_loop(text: str, cursor: Cursor, min_copies: int = 4, max_unit_chars: int = 40,
                     min_unit_alnum: int = 2) -> str:
    """Keep one copy of a unit of 2..`max_unit_chars` characters that the completion repeats back to back at least
    `min_copies` times up to its very end (a last partial copy included), within its last line.

    Reaching the end is what tells a loop from code: the model never got out of it (it ran to its token limit),
    whereas a byte table or a rule of `=` is closed by other text. Units need `min_unit_alnum` letters or digits.
    A one-line completion before text on the cursor's line (`[█]`) is left alone: there the suffix, not a loop, may
    have ended it (`10, 10, 10, 10`).
    """
    start = text.rfind("\n") + 1
    if start == 0 and cursor.line_suffix.strip():
        return text
    line = text[start:]
    n = len(line)
    best: tuple[int, int] | None = None  # (where the run starts, unit length)
    for unit in range(2, min(max_unit_chars, n // min_copies) + 1):
        i = n - 1
        while i >= unit and line[i] == line[i - unit]:
            i -= 1
        run_start = 0 if i < unit else i + 1 - unit  # line[i] breaks the period: the run begins after it
        if n - run_start < min_copies * unit:
            continue
        if sum(c.isalnum() for c in line[run_start : run_start + unit]) < min_unit_alnum:
            continue
        if best is None or run_start < best[0]:
            best = (run_start, unit)
    if best is None:
        return text
    return text[: start + best[0] + best[1]].rstrip()
