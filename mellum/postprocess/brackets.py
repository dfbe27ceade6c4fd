"""Bracket scanning over source text that skips string literals and line comments."""

from __future__ import annotations

from dataclasses import dataclass, field

PAIRS = {")": "(", "]": "[", "}": "{"}
OPENERS = "([{"
QUOTES = "\"'`"


@dataclass
class BracketState:
    """Open brackets (innermost last) and whether a string is open after some text has been scanned."""

    stack: list[str] = field(default_factory=list)
    quote: str | None = None  # the delimiter of the open string: ' " ` ''' or \"\"\"

    def copy(self) -> "BracketState":
        return BracketState(list(self.stack), self.quote)


def scan(text: str, state: BracketState | None = None, line_comment: str | None = None) -> tuple[BracketState, int | None]:
    """Feed `text` into `state`; returns the new state and the index of the first closing bracket that had no
    matching opener (an "unbalanced" closer: it closes something opened before `state` began), or None.

    An unbalanced closer is not pushed or popped: scanning continues as if it closed an outer bracket.
    """
    state = state.copy() if state is not None else BracketState()
    underflow: int | None = None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if state.quote is not None:
            q = state.quote
            if ch == "\\":
                i += 2
                continue
            if text.startswith(q, i):
                state.quote = None
                i += len(q)
                continue
            if ch == "\n" and len(q) == 1 and q != "`":
                state.quote = None  # an unterminated one-line string ends with its line
            i += 1
            continue
        if line_comment and text.startswith(line_comment, i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in QUOTES:
            triple = text[i : i + 3]
            state.quote = triple if triple in ('"""', "'''") else ch
            i += len(state.quote)
            continue
        if ch in OPENERS:
            state.stack.append(ch)
        elif ch in PAIRS:
            if state.stack and state.stack[-1] == PAIRS[ch]:
                state.stack.pop()
            elif state.stack and PAIRS[ch] in state.stack:
                # A mismatched closer: treat the brackets opened after its partner as implicitly closed.
                while state.stack and state.stack.pop() != PAIRS[ch]:
                    pass
            elif underflow is None:
                underflow = i
        i += 1
    return state, underflow
