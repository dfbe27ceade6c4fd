"""Multi-line completions stop at the end of the current block: a dedent, or a bracket closed that the prefix opened."""

from __future__ import annotations

import re

from mellum.postprocess.brackets import BracketState, scan
from mellum.postprocess.cursor import CLOSERS, Cursor, indent_width, opens_block


# A line at the opener's level that carries the same statement on (`else:`, `} catch (e) {`, `case 2:`).
CONTINUATION = re.compile(r"^[)\]}]*\s*(else|elif|except|finally|catch|case|default)\b")


def limit_to_block(text: str, cursor: Cursor) -> str:
    """Cut a multi-line completion where the block at the cursor ends (Tabby's "limit scope by indentation").

    The anchor is the cursor's line as completed (or, when that stays blank, the completion's first non-blank
    line). If the cursor's line opens a block (`def f():█`, `if (x) {█`), body lines are those indented deeper than it;
    a closing line at its level (`}`) is kept and ends the block. Otherwise lines at the anchor's level or deeper
    continue and the first dedented line ends it — unless that line closes a bracket the prefix left open, which
    is kept (the end of the construct the cursor is in). Any line that closes a bracket opened before the
    completion began ends the block after that line. A line continuing the opener's statement (`else:`,
    `} catch {`) does not end it. At the top level of a file, where no dedent can come, a new paragraph (a line at
    column 0 after a blank line) ends the completion: one definition or group of statements at a time.
    """
    if "\n" not in text:
        return text
    lines = text.split("\n")
    tab = cursor.tab_size
    # The first line continues the cursor's line; the others start at column 0.
    absolute = [cursor.line_prefix + lines[0]] + lines[1:]
    anchor = next((i for i, line in enumerate(absolute) if line.strip()), None)
    if anchor is None:
        return text
    anchor_line = absolute[anchor]
    # Only a block opened on the cursor's own line is "the current block"; a block the completion opens on a
    # blank line is a statement inside the enclosing one.
    opened = anchor == 0 and bool(cursor.line_prefix.strip()) and opens_block(anchor_line, cursor.line_comment)
    level = indent_width(anchor_line, tab)

    # Brackets are counted over the completion only, from the string state the cursor is in: a closer with no
    # partner inside the completion closes something the prefix opened.
    state = BracketState(quote=cursor.prefix_brackets.quote)
    for i, line in enumerate(lines):
        chunk = line if i == len(lines) - 1 else line + "\n"
        state, underflow = scan(chunk, state, cursor.line_comment)
        if i > anchor and absolute[i].strip():
            indent = indent_width(absolute[i], tab)
            closer = absolute[i].lstrip()[:1] in CLOSERS
            if opened and indent <= level:
                if indent == level and CONTINUATION.match(absolute[i].lstrip()):
                    pass
                elif indent == level and closer:
                    return "\n".join(lines[: i + 1])
                else:
                    return "\n".join(lines[:i])
            if not opened and level == 0 and indent == 0 and not absolute[i - 1].strip():
                return "\n".join(lines[:i])
            if not opened and indent < level:
                if closer and underflow is not None:
                    return "\n".join(lines[: i + 1])
                return "\n".join(lines[:i])
        if underflow is not None and not CONTINUATION.match(absolute[i].lstrip()):
            return "\n".join(lines[: i + 1])
    return text
