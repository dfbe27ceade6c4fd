"""Open editor buffers: full and incremental text sync, and LSP positions (UTF-16 code units) to string offsets.

LSP positions count UTF-16 code units by default (LSP 3.17 §Position), Python strings count code points, so a
character outside the Basic Multilingual Plane (an emoji, many CJK extensions) is 2 units in the editor and 1
here. Positions from a client may also be wrong: past the end of a line or of the document (clamped to the
end, as the specification says for the line case), negative (clamped to 0), or inside a surrogate pair
(snapped to the start of that character). Nothing here raises on a bad position: a completion at a clamped
position is better than an error popup while typing.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse


_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str) -> str:
    """Replace lone UTF-16 surrogates (which JSON can carry but UTF-8 cannot) by U+FFFD.

    One code point for one: offsets and UTF-16 positions stay where the client thinks they are.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


_LINE_BREAK = re.compile("\r\n|\r|\n")


def line_starts(text: str) -> list[int]:
    """Offsets where each line begins; lines end at \\n, \\r\\n or a lone \\r (LSP 3.17 §TextDocuments).

    One regex pass, linear in the text (a 10 MB buffer: a fraction of a second).
    """
    return [0] + [m.end() for m in _LINE_BREAK.finditer(text)]


def _line_end(text: str, starts: list[int], line: int) -> int:
    """Offset of the end of `line`, before its line break."""
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    if end > starts[line] and text[end - 1] == "\n":
        end -= 1
    if end > starts[line] and text[end - 1] == "\r":
        end -= 1
    return end


def char_width(c: str, encoding: str = "utf-16") -> int:
    """Code units of one code point in the negotiated position encoding (LSP 3.17 `PositionEncodingKind`)."""
    cp = ord(c)
    if encoding == "utf-16":
        return 2 if cp > 0xFFFF else 1
    if encoding == "utf-8":
        return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    return 1  # utf-32: code points, like Python


def offset_at(text: str, line: int, character: int, starts: list[int] | None = None, encoding: str = "utf-16") -> int:
    """String offset of an LSP position (`character` in `encoding` units), clamped into the document."""
    starts = starts if starts is not None else line_starts(text)
    if line < 0:
        return 0
    if line >= len(starts):
        return len(text)
    start, end = starts[line], _line_end(text, starts, line)
    if character <= 0:
        return start
    if encoding == "utf-32":
        return min(start + character, end)
    units = 0
    for i in range(start, end):
        width = char_width(text[i], encoding)
        if units + width > character:  # `character` falls inside this character (a surrogate pair, a UTF-8 run)
            return i
        units += width
        if units == character:
            return i + 1
    return end


def position_at(text: str, offset: int, starts: list[int] | None = None, encoding: str = "utf-16") -> tuple[int, int]:
    """LSP (line, character in `encoding` units) of a string offset."""
    starts = starts if starts is not None else line_starts(text)
    offset = max(0, min(offset, len(text)))
    line = bisect.bisect_right(starts, offset) - 1
    character = sum(char_width(c, encoding) for c in text[starts[line]:offset])
    return line, character


def uri_to_path(uri: str) -> str:
    """A file path for a `file://` URI; other schemes (untitled:, ...) keep their path part as a name."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return str(Path(unquote(parsed.path)))
    return unquote(parsed.path or uri)


@dataclass
class Document:
    uri: str
    text: str
    version: int = 0
    language_id: str = ""
    encoding: str = "utf-16"
    _starts: list[int] | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return uri_to_path(self.uri)

    @property
    def starts(self) -> list[int]:
        if self._starts is None:
            self._starts = line_starts(self.text)
        return self._starts

    def offset(self, line: int, character: int) -> int:
        return offset_at(self.text, line, character, self.starts, self.encoding)

    def apply(self, text: str, rng: tuple[int, int, int, int] | None = None) -> None:
        """Apply one content change: the whole text (rng None) or a replacement of (l0, c0, l1, c1)."""
        text = scrub(text)
        if rng is None:
            self.text = text
        else:
            a, b = self.offset(rng[0], rng[1]), self.offset(rng[2], rng[3])
            if b < a:
                a, b = b, a
            self.text = self.text[:a] + text + self.text[b:]
        self._starts = None


class DocumentStore:
    """The buffers the editor has open, keyed by URI; safe to read from worker threads."""

    def __init__(self, encoding: str = "utf-16"):
        self.encoding = encoding  # set from the position encoding negotiated at `initialize`
        self._docs: dict[str, Document] = {}
        self._lock = threading.Lock()

    def open(self, uri: str, text: str, version: int = 0, language_id: str = "") -> Document:
        with self._lock:
            doc = self._docs[uri] = Document(uri, scrub(text), version, language_id, self.encoding)
        return doc

    def change(self, uri: str, changes: list[tuple[str, tuple[int, int, int, int] | None]],
               version: int) -> Document | None:
        """Apply changes in order (LSP sends them in the order they were made).

        A buffer never opened has no text a range could point into: its range edits are dropped (applied to an
        empty text they would build a buffer unlike the editor's, and completions would come from that), and a
        whole-text change opens it. None while the buffer stays unknown.
        """
        with self._lock:
            doc = self._docs.get(uri)
            for text, rng in changes:
                if doc is None and rng is not None:
                    continue
                if doc is None:
                    doc = self._docs[uri] = Document(uri, "", encoding=self.encoding)
                doc.apply(text, rng)
            if doc is not None:
                doc.version = version
        return doc

    def close(self, uri: str) -> None:
        with self._lock:
            self._docs.pop(uri, None)

    def get(self, uri: str) -> Document | None:
        with self._lock:
            return self._docs.get(uri)

    def snapshot(self) -> dict[str, str]:
        """Path → text of every open buffer (unsaved edits feed the project index)."""
        with self._lock:
            return {d.path: d.text for d in self._docs.values()}

    def __len__(self) -> int:
        return len(self._docs)
