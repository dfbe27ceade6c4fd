"""The text around the cursor, as the post-processing filters see it: prefix, suffix and what they imply."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath

from mellum.postprocess.brackets import BracketState, scan

# Characters that may follow the cursor on its line without making it "mid-line": an editor's auto-closed
# brackets and quotes, and separators (Continue and Tabby treat these the same way, REFERENCE.md §3).
CLOSERS = ")]}"
TRAILING_PUNCTUATION = CLOSERS + "\"'`;,:"

# A line that ends with one of these opens a block (or a bracketed list) that the next lines fill.
BLOCK_OPENERS = (":", "{", "(", "[", "=>", "->")

# Line-comment marker by file extension; unknown extensions get none, so `//` (floor division in Python)
# and `#` (private fields in JavaScript) are never mistaken for comments in the wrong language.
_HASH = {".py", ".pyi", ".rb", ".sh", ".bash", ".zsh", ".yaml", ".yml", ".toml", ".r", ".pl", ".jl", ".nim", ".ex", ".exs"}
_SLASH = {
    ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".java", ".kt", ".kts", ".go", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".cs", ".rs", ".swift", ".scala", ".php", ".dart", ".groovy", ".m", ".zig",
}

# Languages whose standard formatter indents with tabs: the default when a file shows no indentation yet.
_TAB_INDENTED = {".go"}


def line_comment_for(path: str | None) -> str | None:
    """The line-comment marker of a file's language, from its extension (None when unknown)."""
    if not path:
        return None
    ext = PurePosixPath(path).suffix.lower()
    return "#" if ext in _HASH else "//" if ext in _SLASH else None


def indent_width(line: str, tab_size: int = 4) -> int:
    """Columns of leading whitespace, tabs counted as `tab_size`."""
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += tab_size
        else:
            break
    return width


def leading_whitespace(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _indent_style(lines: list[str], tab_size: int, cursor_line_last: bool) -> str | None:
    """A tab, or the most common step between space indents, of some lines; None when none is indented."""
    tabs = spaces = 0
    steps: dict[int, int] = {}
    last = 0
    for i, line in enumerate(lines):
        if not line.strip() and not (cursor_line_last and i == len(lines) - 1 and line):
            continue  # blank lines say nothing
        ws = leading_whitespace(line)
        if ws.startswith("\t"):
            tabs += 1
        elif ws:
            spaces += 1
        width = len(ws.expandtabs(tab_size))
        if width > last:
            steps[width - last] = steps.get(width - last, 0) + 1
        last = width
    if not tabs and not spaces:
        return None
    if tabs > spaces:
        return "\t"
    step = max(steps, key=lambda s: (steps[s], -s)) if steps else 4
    return " " * (step if 1 < step <= 8 else 4)


def opens_block(line: str, line_comment: str | None = None) -> bool:
    """Whether a line ends (ignoring a trailing comment and whitespace) with a block or bracket opener."""
    code = line
    if line_comment and line_comment in code:
        code = code[: code.index(line_comment)]
    return code.rstrip().endswith(BLOCK_OPENERS)


@dataclass(frozen=True)
class Cursor:
    """Prefix and suffix of the file at the cursor; `multiline` forces the single/multi-line decision when set."""

    prefix: str
    suffix: str
    path: str | None = None
    multiline: bool | None = None
    tab_size: int = 4
    bracket_window_chars: int = 4000  # brackets are counted over this much prefix (a scan costs ~1 ms per 1,000)

    @cached_property
    def line_prefix(self) -> str:
        """The current line up to the cursor."""
        return self.prefix[self.prefix.rfind("\n") + 1 :]

    @cached_property
    def line_suffix(self) -> str:
        """The current line from the cursor to its end (without the newline)."""
        return self.suffix.split("\n", 1)[0]

    @cached_property
    def line_comment(self) -> str | None:
        return line_comment_for(self.path)

    @property
    def mid_line(self) -> bool:
        """Text other than closing brackets, quotes and separators follows the cursor on its line."""
        rest = self.line_suffix.strip()
        return bool(rest.strip(TRAILING_PUNCTUATION + " \t"))

    @property
    def at_blank_line(self) -> bool:
        return not self.line_prefix.strip() and not self.line_suffix.strip()

    @cached_property
    def previous_line(self) -> str:
        """The last non-blank line before the current one ('' at the top of the file)."""
        before = self.prefix[: len(self.prefix) - len(self.line_prefix)]
        for line in reversed(before.split("\n")):
            if line.strip():
                return line
        return ""

    @cached_property
    def next_suffix_line(self) -> str:
        """The first non-blank line of the suffix after the current line ('' if none)."""
        for line in self.suffix.split("\n")[1:]:
            if line.strip():
                return line
        return ""

    @cached_property
    def indent_unit(self) -> str:
        """One level of indentation in this file: a tab, or the most common step between space indents. Read from
        the prefix; when no line there is indented (the first function of a file), from the suffix; else the
        language's convention (a tab for Go, whose gofmt mandates them; four spaces otherwise)."""
        # Recent lines are enough to see the style; the cursor's own line (last of the prefix) counts even when
        # blank, since an editor's auto-indent shows the unit.
        unit = _indent_style(self.prefix.split("\n")[-400:], self.tab_size, cursor_line_last=True)
        if unit is None:
            unit = _indent_style(self.suffix.split("\n")[1:400], self.tab_size, cursor_line_last=False)
        if unit is None:
            unit = "\t" if self.path and PurePosixPath(self.path).suffix.lower() in _TAB_INDENTED else "    "
        return unit

    @cached_property
    def prefix_brackets(self) -> BracketState:
        """Brackets left open by the prefix (and the string the cursor is in, if any), counted from the first
        line start within the last `bracket_window_chars` characters: the constructs a completion can close
        are near the cursor, and a whole-file scan would cost tens of milliseconds per request."""
        text = self.prefix
        if len(text) > self.bracket_window_chars:
            text = text[-self.bracket_window_chars :]
            text = text[text.find("\n") + 1 :]
        return scan(text, line_comment=self.line_comment)[0]

    @property
    def uses_tabs(self) -> bool:
        return self.indent_unit == "\t"
