"""Project index: the files of a workspace cut into chunks, with identifier postings (BM25) and definitions.

Discovery respects `.gitignore` files and the configured ignore list, skips binary, huge, generated and
secret-looking files, and never follows symbolic links (so never out of the root). Editor buffers passed to
`update` must resolve to a path inside the root. The index is incremental:
`update(path, text)` replaces one file (an unsaved editor buffer or a change on disk) without re-reading the rest.
"""

from __future__ import annotations

import math
import os
import re
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from mellum.context.config import ContextConfig
from mellum.context.ignore import IgnoreRules, is_secret, language_of, parse_rules
from mellum.data.filters import GENERATED

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Words that say nothing about which file is relevant (keywords of the indexed languages, ubiquitous names).
STOPWORDS = frozenset(
    """and as assert async await break case catch class const continue def default del do elif else enum except
    export extends false final finally for from func function global go if implements import in instanceof interface
    is lambda let new nil none not null of or package pass private protected public raise return self static super
    switch this throw throws true try type typeof val var void while with yield None True False fun object override
    struct map chan defer range select int str bool float string len print args kwargs cls""".split()
)

# Lines that start a definition, per language; group 1 is the defined name.
_DEF_PATTERNS: dict[str, re.Pattern[str]] = {
    "python": re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+([A-Za-z_]\w*)|^([A-Za-z_]\w*)[ \t]*(?::[^=\n]+)?=(?!=)", re.M),
    "javascript": re.compile(
        r"^[ \t]*(?:export[ \t]+)?(?:default[ \t]+)?(?:(?:async|abstract|declare)[ \t]+)?"
        r"(?:function\*?|class|const|let|var)[ \t]+([A-Za-z_$][\w$]*)"
        # Methods of classes and object literals (`  async save(item) {`, `  get total(): number {`): an indented
        # name, its parameters, then `{`. A call never ends in `{`; `if (x) {` and the like name keywords.
        r"|^[ \t]+(?:(?:public|private|protected|static|async|readonly|override|abstract|get|set)[ \t]+)*"
        r"\*?[ \t]*#?([A-Za-z_$][\w$]*)[ \t]*\??[ \t]*(?:<[^>\n]*>)?"
        r"[ \t]*\([^()\n]*(?:\([^()\n]*\)[^()\n]*)*\)[ \t]*(?::[^{;=\n]+)?\{",
        re.M,
    ),
    "java": re.compile(
        r"^[ \t]*(?:(?:public|private|protected|static|final|abstract|sealed)[ \t]+)*(?:class|interface|enum|record|@interface)[ \t]+(\w+)"
        r"|^[ \t]+(?:(?:public|private|protected|static|final|abstract|synchronized|native|default)[ \t]+)+[\w<>\[\],.? ]+?[ \t]+(\w+)[ \t]*\("
        # Methods without modifiers (package-private ones, interface methods): `    Item find(String id);` — a type,
        # a name and one line of parameters ending in `{` or `;`; statements that look alike start with a keyword.
        r"|^[ \t]+(?!(?:return|new|throw|else|yield|assert|case|await)\b)(?:<[^>\n]*>[ \t]+)?"
        r"[\w$.]+(?:<[^\n(]*>)?(?:\[\])*[ \t]+(\w+)[ \t]*\([^()\n]*\)[ \t]*(?:throws[ \t]+[\w.,$ \t]+)?[{;]",
        re.M,
    ),
    "kotlin": re.compile(
        r"^[ \t]*(?:(?:public|private|internal|protected|open|abstract|sealed|data|inline|suspend|override|enum|annotation|companion|const)[ \t]+)*"
        r"(?:fun|class|interface|object|val|var|typealias)[ \t]+(?:<[^>]*>[ \t]*)?(?:[\w.]+\.)?(\w+)",
        re.M,
    ),
    "go": re.compile(r"^func[ \t]+(?:\([^)]*\)[ \t]*)?(\w+)|^type[ \t]+(\w+)|^(?:var|const)[ \t]+(\w+)", re.M),
}
_DEF_PATTERNS["typescript"] = re.compile(
    _DEF_PATTERNS["javascript"].pattern + r"|^[ \t]*(?:export[ \t]+)?(?:interface|type|enum)[ \t]+(\w+)", re.M
)
_DEF_PATTERNS["tsx"] = _DEF_PATTERNS["typescript"]
_GO_GROUP = re.compile(r"^(?:const|var|type)[ \t]*\([ \t]*\n(.*?)^\)", re.M | re.S)
_GO_GROUP_NAME = re.compile(r"^(?:\t| {4})([A-Za-z_]\w*)", re.M)  # one level in (gofmt): not a field of a value


def identifiers(text: str) -> list[str]:
    """Identifiers of a piece of code, keywords and one-letter names left out."""
    return [w for w in IDENTIFIER.findall(text) if len(w) > 1 and w not in STOPWORDS]


def split_lines(text: str) -> list[str]:
    """The lines of a text, each with its newline, ending at "\\n" only: `str.splitlines` also ends lines at form
    feeds, U+2028 and other separators, which definition line numbers, editors and the filters do not count."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    if not lines[-1]:
        lines.pop()
    return lines


def definitions(text: str, language: str) -> list[tuple[str, int]]:
    """(name, 0-based line) of each definition a line-level pattern finds (functions, classes, types, constants)."""
    pattern = _DEF_PATTERNS.get(language)
    if pattern is None:
        return []
    out = []
    line, pos = 0, 0
    for m in pattern.finditer(text):
        name = next((g for g in m.groups() if g), None)
        if name and name not in STOPWORDS:
            line, pos = line + text.count("\n", pos, m.start()), m.start()  # counted on from the last match
            out.append((name, line))
    if language == "go":  # grouped declarations: `const (\n\tRed Color = iota\n\tGreen\n)`, `type (...)`, `var (...)`
        for group in _GO_GROUP.finditer(text):
            first = text.count("\n", 0, group.start(1))
            body = group.group(1)
            for m in _GO_GROUP_NAME.finditer(body):
                if m.group(1) not in STOPWORDS:
                    out.append((m.group(1), first + body.count("\n", 0, m.start())))
        out.sort(key=lambda d: d[1])
    return out


@dataclass(eq=False)
class FileEntry:
    """One indexed file: its text (disk or editor buffer), language, chunks and definitions."""

    path: str  # posix, relative to the root
    language: str
    text: str
    chunk_ids: list[int] = field(default_factory=list)
    defs: list[tuple[str, int]] = field(default_factory=list)
    from_buffer: bool = False


@dataclass(eq=False, slots=True)
class Chunk:
    """A window of whole lines of one file: [start_line, end_line), character offsets [start, end)."""

    id: int
    file: FileEntry
    start_line: int
    end_line: int
    start: int
    end: int

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def text(self) -> str:
        return self.file.text[self.start : self.end]


class ProjectIndex:
    """The files of one workspace root, cut into chunks, searchable by identifiers, path and definitions."""

    def __init__(self, root: str | os.PathLike, config: ContextConfig | None = None, progress: bool = False):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"project root {root} is not a directory")
        self.config = config or ContextConfig()
        self.files: dict[str, FileEntry] = {}
        self.chunks: list[Chunk | None] = []  # by id; None once its file changed
        self.skipped: Counter[str] = Counter()  # why files were left out (for reports and tests)
        self.rules = IgnoreRules(parse_rules([*self.config.ignore, *self.config.extra_ignore]))
        self._post_ids: dict[str, array] = {}
        self._post_tf: dict[str, array] = {}
        self._alive = np.zeros(0, dtype=bool)
        self._length = np.zeros(0, dtype=np.float32)  # identifiers per chunk (BM25 document length)
        self._distinct = np.zeros(0, dtype=np.float32)  # distinct identifiers per chunk (Jaccard denominators)
        self._n_alive = 0
        self._total_len = 0.0
        self._defs: dict[str, list[tuple[str, int]]] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()  # path → time of last update, oldest first
        self._stamps: dict[str, tuple[int, int]] = {}  # path → (mtime_ns, size) of the disk file when it was read
        self._updates_since_build = 0
        self._dir_rules: dict[str, IgnoreRules] = {}  # rules in force in each walked directory
        self.generation = 0  # bumped whenever the set of files changes
        self._tables: tuple[int, dict[str, list[str]], dict[str, list[str]]] | None = None
        t0 = time.perf_counter()
        self._build(progress)
        self.build_seconds = time.perf_counter() - t0

    # ---- discovery ---------------------------------------------------------------------------------
    def _build(self, progress: bool) -> None:
        for rel, text in self.discover(progress):
            self._add(rel, text, from_buffer=False)
        self._updates_since_build = 0

    def discover(self, progress: bool = False) -> Iterable[tuple[str, str]]:
        """(relative path, text) of every file the index keeps, walking the root without leaving it."""
        cfg = self.config
        stack: list[tuple[str, IgnoreRules]] = [("", self.rules)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="indexing", unit=" files")
        count = 0
        while stack:
            rel_dir, rules = stack.pop()
            abs_dir = os.path.join(self.root, rel_dir)
            if cfg.use_gitignore and os.path.isfile(os.path.join(abs_dir, ".gitignore")):
                try:
                    with open(os.path.join(abs_dir, ".gitignore"), encoding="utf-8", errors="replace") as f:
                        rules = rules.extended(parse_rules(f, rel_dir))
                except OSError:
                    pass
            self._dir_rules[rel_dir] = rules
            try:
                entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
            except OSError:
                continue
            subdirs = []
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_symlink():
                    # Never followed: a link may lead out of the root (or loop), and one inside it names a file
                    # or folder the walk reaches at its real place anyway.
                    self.skipped["symlink"] += 1
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if rules.ignored(rel, is_dir=True):
                        self.skipped["ignored"] += 1
                    else:
                        subdirs.append((rel, rules))
                    continue
                if rules.ignored(rel, is_dir=False):
                    self.skipped["ignored"] += 1
                    continue
                if not entry.is_file(follow_symlinks=False):
                    # A named pipe, socket or device: reading one can block forever (a FIFO waits for a writer).
                    self.skipped["special"] += 1
                    continue
                text = self._read(rel, entry.path)
                if text is not None:
                    count += 1
                    if bar is not None:
                        bar.update()
                    yield rel, text
                    if count >= cfg.max_files:
                        self.skipped["max_files"] += 1
                        return
            stack.extend(reversed(subdirs))
        if bar is not None:
            bar.close()

    def _read(self, rel: str, abs_path: str) -> str | None:
        """The file's text, or None (counting why) when it is not for the index."""
        cfg = self.config
        language = language_of(rel)
        if language is None or (cfg.languages is not None and language not in cfg.languages):
            self.skipped["language"] += 1
            return None
        if is_secret(rel):
            self.skipped["secret"] += 1
            return None
        try:
            st = os.stat(abs_path)
            if st.st_size > cfg.max_file_bytes:
                self.skipped["huge"] += 1
                return None
            with open(abs_path, "rb") as f:
                data = f.read()
            self._stamps[rel] = (st.st_mtime_ns, st.st_size)  # stat before reading: a later write changes it
        except OSError:
            self.skipped["unreadable"] += 1
            return None
        if b"\0" in data[:8192]:
            self.skipped["binary"] += 1
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped["binary"] += 1
            return None
        reason = self._reject(rel, text)
        if reason:
            self.skipped[reason] += 1
            return None
        return text

    def _reject(self, rel: str, text: str) -> str | None:
        """Why a file's content keeps it out of the index ('secret', 'generated'), or None."""
        if is_secret(rel, text):
            return "secret"
        # The corpus filter's test: a notice about the file itself, not the phrase anywhere (`ast.py` says "an
        # abstract syntax tree can be generated by passing ...", tomli `__version__ = "2.0.1"  # DO NOT EDIT ...`).
        if GENERATED.search(text, 0, 600):
            return "generated"
        lines = text.count("\n") + 1
        if len(text) / lines > self.config.max_line_chars:
            return "generated"  # minified
        return None

    # ---- incremental updates ----------------------------------------------------------------------
    def relative(self, path: str | os.PathLike) -> str | None:
        """The posix path of `path` relative to the root, or None when it lies outside (links resolved)."""
        p = Path(path)
        if not p.is_absolute():
            p = self.root / p
        try:
            rel = Path(os.path.realpath(p)).relative_to(self.root)
        except ValueError:
            return None
        return rel.as_posix()

    def update(self, path: str | os.PathLike, text: str | None = None) -> bool:
        """Replace one file: `text` is an editor buffer (None re-reads the disk; a missing file is removed).

        Returns whether the file is now part of the index (False for secret, ignored or foreign files).
        """
        rel = self.relative(path)
        if rel is None:
            return False
        if self.ignored(rel):
            self.remove(rel)
            return False
        if text is None:
            abs_path = self.root / rel
            text = self._read(rel, str(abs_path)) if abs_path.is_file() else None
            if text is None:
                self.remove(rel)
                return False
            from_buffer = False
        else:
            too_big = len(text) > self.config.max_file_bytes
            if language_of(rel) is None or is_secret(rel) or too_big or self._reject(rel, text):
                self.remove(rel)
                return False
            from_buffer = True
        old = self.files.get(rel)
        if old is not None and old.text == text:
            return True  # unchanged: not an edit, so not "recent" either
        self.remove(rel)
        self._add(rel, text, from_buffer)
        self._touch(rel)
        self._updates_since_build += 1
        if self._updates_since_build >= self.config.rebuild_after_updates:
            self._compact()
        return True

    def fresh(self, rel: str) -> bool:
        """Whether the entry of an indexed file still holds what the disk has. A file changed on disk since it was
        read (mtime or size differ) is read again, a deleted one dropped: both return False, so that chunks taken
        from the old text are not used. Editor buffers are fresh by definition. A long-running server learns of
        edits made outside the editor (a `git checkout`, a generator, a deletion) here, one stat per file."""
        entry = self.files.get(rel)
        if entry is None:
            return False
        if entry.from_buffer:
            return True
        try:
            st = os.stat(self.root / rel)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamps.get(rel):
            return True
        self.update(rel)  # re-read (an unchanged text keeps the entry) or, when gone or now unfit, removed
        return self.files.get(rel) is entry

    def ignored(self, rel: str) -> bool:
        """Is a root-relative path excluded by the ignore list or a .gitignore seen during discovery?"""
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        while parent not in self._dir_rules and parent:
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
        return self._dir_rules.get(parent, self.rules).ignored_path(rel)

    def remove(self, path: str) -> None:
        """Drop a file (deleted, or turned secret) from the index."""
        rel = self.relative(path) if os.path.isabs(path) else path
        entry = self.files.pop(rel, None) if rel else None
        if entry is None:
            return
        for cid in entry.chunk_ids:
            self.chunks[cid] = None
            self._alive[cid] = False
            self._n_alive -= 1
            self._total_len -= float(self._length[cid])
        for name, _ in entry.defs:
            places = [p for p in self._defs.get(name, []) if p[0] != rel]
            if places:
                self._defs[name] = places
            else:
                self._defs.pop(name, None)
        self._recent.pop(rel, None)
        self.generation += 1

    def _touch(self, rel: str) -> None:
        self._recent.pop(rel, None)
        self._recent[rel] = time.monotonic()

    def recent(self, n: int) -> list[str]:
        """Paths updated most recently (editor changes), newest first."""
        return list(reversed(self._recent))[:n]

    # ---- adding files --------------------------------------------------------------------------------
    def _add(self, rel: str, text: str, from_buffer: bool) -> None:
        entry = FileEntry(rel, language_of(rel) or "text", text, from_buffer=from_buffer)
        entry.defs = definitions(text, entry.language)
        for name, line in entry.defs:
            self._defs.setdefault(name, []).append((rel, line))
        starts = {line for _, line in entry.defs}
        for start_line, end_line, start, end in self._cut(text, starts):
            words = identifiers(text[start:end])
            if not words:
                continue
            cid = len(self.chunks)
            self.chunks.append(Chunk(cid, entry, start_line, end_line, start, end))
            entry.chunk_ids.append(cid)
            self._index_terms(cid, words)
        self._grow(len(self.chunks))
        for cid in entry.chunk_ids:
            self._alive[cid] = True
        self._n_alive += len(entry.chunk_ids)
        self.files[rel] = entry
        self.generation += 1

    def _cut(self, text: str, def_lines: set[int]) -> Iterable[tuple[int, int, int, int]]:
        """Chunks of whole lines: (start_line, end_line, start_char, end_char); a new chunk starts at a
        definition once the current one has `min_chunk_lines` lines, and always after `chunk_lines` lines."""
        cfg = self.config
        lines = split_lines(text)  # line numbers must agree with `definitions` (counted in "\n")
        start_line, start, pos = 0, 0, 0
        for i, line in enumerate(lines):
            n = i - start_line
            boundary = i in def_lines or (line[:1].strip() and i > 0 and not lines[i - 1].strip())
            if n >= cfg.chunk_lines or (n >= cfg.min_chunk_lines and boundary) or (n and pos - start >= cfg.max_chunk_chars):
                yield start_line, i, start, pos
                start_line, start = i, pos
            pos += len(line)
        if pos > start:
            yield start_line, len(lines), start, pos

    def _index_terms(self, cid: int, words: list[str]) -> None:
        self._grow(cid + 1)
        self._length[cid] = len(words)
        self._total_len += len(words)
        counts = Counter(words)
        self._distinct[cid] = len(counts)
        for term, tf in counts.items():
            ids = self._post_ids.get(term)
            if ids is None:
                ids = self._post_ids[term] = array("i")
                self._post_tf[term] = array("f")
            ids.append(cid)
            self._post_tf[term].append(tf)

    def _grow(self, n: int) -> None:
        if len(self._alive) < n:
            size = max(n, 2 * len(self._alive), 1024)
            alive, length, distinct = np.zeros(size, dtype=bool), np.zeros(size, np.float32), np.zeros(size, np.float32)
            alive[: len(self._alive)] = self._alive
            length[: len(self._length)] = self._length
            distinct[: len(self._distinct)] = self._distinct
            self._alive, self._length, self._distinct = alive, length, distinct

    def _compact(self) -> None:
        """Drop postings of replaced chunks so document frequencies stay true (after many updates)."""
        alive = self._alive
        for term in list(self._post_ids):
            ids = np.frombuffer(self._post_ids[term], dtype=np.int32)
            keep = alive[ids]
            if keep.all():
                continue
            if not keep.any():
                del self._post_ids[term], self._post_tf[term]
                continue
            tf = np.frombuffer(self._post_tf[term], dtype=np.float32)
            self._post_ids[term] = array("i", ids[keep].tobytes())
            self._post_tf[term] = array("f", tf[keep].tobytes())
        self._updates_since_build = 0

    # ---- queries -----------------------------------------------------------------------------------
    def definitions_of(self, name: str) -> list[tuple[str, int]]:
        """(path, line) of every definition of `name` in the project."""
        return self._defs.get(name, [])

    def _lookup_tables(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        if self._tables is None or self._tables[0] != self.generation:
            by_tail: dict[str, list[str]] = {}
            by_dir: dict[str, list[str]] = {}
            for rel in sorted(self.files):
                parts = rel.split("/")
                for k in range(len(parts)):
                    by_tail.setdefault("/".join(parts[k:]), []).append(rel)
                by_dir.setdefault("/".join(parts[:-1]), []).append(rel)
            self._tables = (self.generation, by_tail, by_dir)
        return self._tables[1], self._tables[2]

    def files_ending_with(self, tail: str) -> list[str]:
        """Indexed paths equal to `tail` or ending with '/' + `tail` (resolving imports to files)."""
        return self._lookup_tables()[0].get(tail, [])

    def files_in_dir(self, rel_dir: str) -> list[str]:
        """Indexed files directly inside a root-relative directory ('' for the root)."""
        return self._lookup_tables()[1].get(rel_dir, [])

    def directories(self) -> list[str]:
        return list(self._lookup_tables()[1])

    def chunk_at(self, path: str, line: int) -> Chunk | None:
        entry = self.files.get(path)
        if entry is None:
            return None
        for cid in entry.chunk_ids:
            chunk = self.chunks[cid]
            if chunk is not None and chunk.start_line <= line < chunk.end_line:
                return chunk
        return None

    def lexical(self, terms: Iterable[str]) -> "Lexical":
        """BM25 scores and identifier-set Jaccard similarities of every chunk against a bag of query terms,
        both from one pass over the terms' postings (dead chunks score 0)."""
        terms = list(dict.fromkeys(terms))
        ids_parts, tf_parts, idf_parts = [], [], []
        n = max(self._n_alive, 1)
        common = max(64, int(self.config.max_term_share * n))
        used = 0
        for term in terms:
            ids = self._post_ids.get(term)
            if not ids or len(ids) > common:  # in most chunks: says little, costs most
                continue
            used += 1
            df = len(ids)  # counts replaced chunks too until the next compaction: close enough
            ids_parts.append(np.frombuffer(ids, dtype=np.int32))
            tf_parts.append(np.frombuffer(self._post_tf[term], dtype=np.float32))
            idf_parts.append(np.full(df, math.log(1.0 + (n - df + 0.5) / (df + 0.5)), dtype=np.float32))
        size = len(self.chunks)
        if not ids_parts:
            return Lexical(np.zeros(size), np.zeros(size))
        ids, tf, idf = np.concatenate(ids_parts), np.concatenate(tf_parts), np.concatenate(idf_parts)
        # Okapi BM25 (Robertson & Zaragoza 2009, eq. 3.15): idf · tf·(k1+1) / (tf + k1·(1 − b + b·len/avg_len))
        k1, b = self.config.bm25_k1, self.config.bm25_b
        avg_len = max(self._total_len / n, 1.0)
        norm = k1 * (1.0 - b + b * self._length[ids] / avg_len)
        alive = self._alive[:size]
        bm25 = np.bincount(ids, weights=idf * tf * (k1 + 1.0) / (tf + norm), minlength=size) * alive
        # Jaccard |W ∩ C| / |W ∪ C| over identifier sets, W the query's distinct terms (Cody's window similarity).
        inter = np.bincount(ids, minlength=size).astype(np.float32)
        union = used + self._distinct[:size] - inter
        jaccard = np.where(alive & (inter > 0), inter / np.maximum(union, 1.0), 0.0)
        return Lexical(bm25, jaccard)

    def bm25(self, terms: Iterable[str], top_k: int, exclude: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, score) of the `top_k` chunks scoring highest under Okapi BM25 for the query terms."""
        return top_chunks(self.lexical(terms).bm25, top_k, self.files[exclude].chunk_ids if exclude in self.files else ())

    def stats(self) -> dict[str, int]:
        return {
            "files": len(self.files),
            "chunks": self._n_alive,
            "terms": len(self._post_ids),
            "definitions": sum(len(v) for v in self._defs.values()),
            **{f"skipped_{k}": v for k, v in sorted(self.skipped.items())},
        }


@dataclass
class Lexical:
    """Per-chunk lexical scores of one query (arrays indexed by chunk id)."""

    bm25: np.ndarray
    jaccard: np.ndarray


def top_chunks(scores: np.ndarray, top_k: int, exclude: Iterable[int] = (), only: Iterable[int] | None = None) -> list[tuple[int, float]]:
    """(chunk id, score) of the best `top_k` positive scores, best first, ties by chunk id (same every call)."""
    if only is not None:
        ids = np.fromiter(only, dtype=np.int64)
        sub = scores[ids] if len(ids) else np.zeros(0)
    else:
        ids, sub = None, scores
    exclude = list(exclude)
    if exclude and ids is None:
        sub = sub.copy()
        sub[exclude] = 0.0
    elif exclude:
        sub = np.where(np.isin(ids, exclude), 0.0, sub)
    k = min(top_k, int((sub > 0).sum()))
    if k == 0:
        return []
    top = np.argpartition(-sub, k - 1)[:k]
    keys = top if ids is None else ids[top]
    order = np.lexsort((keys, -sub[top]))
    return [(int(keys[i]), float(sub[top[i]])) for i in order]
