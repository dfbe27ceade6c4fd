"""Context packer: spends a prompt's token budget on the prefix, the suffix and the most relevant project chunks.

Budget = window − max new tokens (or the request's own). The prefix keeps up to `prefix_share` of it (trimmed from
the top), the suffix up to `suffix_share` (trimmed from the bottom); context chunks get the rest, chosen by
reciprocal-rank fusion of the candidate sources without near-duplicates or repeats of the cursor window, and
tokens they leave unused go back to the prefix and suffix. Pieces come out least relevant first, most relevant
last (nearest the cursor), in an order kept stable between keystrokes so the engine's prefix cache hits.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from mellum.context import sources as src
from mellum.context.config import ContextConfig
from mellum.context.ignore import is_secret, language_of
from mellum.context.index import ProjectIndex, split_lines
from mellum.context.rank import Candidate, fuse, line_set, redundant
from mellum.prompt import ContextFile, PromptFormat, get_format

CountTokens = Callable[[str], int]
CountSegments = Callable[[Sequence[tuple[str, str]]], int]  # a prompt's `PromptFormat.segments`, encoded


@dataclass(frozen=True)
class ContextPiece(ContextFile):
    """A context file (or chunk of one) with its relevance score and the tokens its rendered block costs."""

    score: float = 0.0
    tokens: int = 0
    sources: tuple[str, ...] = ()
    start_line: int = 0


@dataclass
class PackResult:
    """What goes into one prompt: context pieces (most relevant last), the trimmed prefix and suffix."""

    pieces: list[ContextPiece]
    prefix: str
    suffix: str
    tokens_used: int  # of the whole rendered prompt, counted once at the end
    budget: int
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    context_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def context(self) -> list[ContextFile]:
        return list(self.pieces)


class _TokenCache:
    """Token counts of rendered context blocks, remembered across requests (chunks rarely change)."""

    def __init__(self, count: CountSegments, size: int = 50_000):
        self.count = count  # over the block's segments: code in it is text, whatever control tokens it spells
        self.size = size
        self.chars_per_token = 3.0  # running estimate, to skip counting chunks that cannot fit
        self._cache: OrderedDict[tuple[str, str], int] = OrderedDict()

    def known(self, path: str, text: str) -> int | None:
        return self._cache.get((path, text))

    def block(self, fmt: PromptFormat, path: str, text: str) -> int:
        key = (path, text)
        n = self._cache.get(key)
        if n is None:
            segments = fmt.context_segments([ContextFile(path, text)])
            n = self._cache[key] = self.count(segments)
            self.chars_per_token = 0.9 * self.chars_per_token + 0.1 * sum(len(s) for _, s in segments) / max(n, 1)
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return n


class ContextPacker:
    """Builds the context of a completion request from a project index under a token budget.

    `count_tokens` counts caller text (prefix, suffix, lines) as the prompt encodes it; `count_segments` counts
    rendered prompt parts given as `PromptFormat.segments`, where only template literals hold control tokens. A
    prompt is encoded that way (`Tokenizer.encode_segments`), so code that contains `<fim_prefix>` costs the tokens
    of its characters, and the prefix is encoded on its own; `for_tokenizer` pairs the two. Without
    `count_segments`, the rendered prompt goes through `count_tokens` whole (a counter reading special strings as
    single tokens is then exact only for code that holds none).
    """

    def __init__(self, index: ProjectIndex | None, count_tokens: CountTokens, config: ContextConfig | None = None,
                 count_segments: CountSegments | None = None):
        self.index = index
        self.config = config or (index.config if index is not None else ContextConfig())
        self.count = count_tokens
        self.count_segments = count_segments or (lambda segments: count_tokens("".join(s for _, s in segments)))
        self._prefix_alone = count_segments is not None  # counting as a prompt is encoded (see `_count_prompt`)
        self.format = get_format(self.config.prompt_format)
        self._tokens = _TokenCache(self.count_segments)
        self._last_order: dict[str, list[tuple[str, str]]] = {}  # current path → piece keys of its last prompt
        self._lines = LineCosts(count_tokens)
        self._memo: dict[str, int] = {}  # counts of joined prefix/suffix texts within one request
        self._additive = (_counts_add_up(self.format, self.count_segments) if self.config.verify_total is None
                          else not self.config.verify_total)
        self._overhead: dict[str, int] = {}
        self._buffers: set[str] = set()  # files indexed from the last request's editor buffers

    @classmethod
    def for_tokenizer(cls, index: ProjectIndex | None, tokenizer, config: ContextConfig | None = None) -> ContextPacker:
        """A packer counting exactly as `tokenizer.encode_segments` encodes the prompt: caller text as plain text,
        control tokens only where the format's templates put them."""
        return cls(index, tokenizer.count, config, lambda segments: len(tokenizer.encode_segments(segments)))

    def _count_prompt(self, rel: str, prefix: str, suffix: str, pieces: Sequence[ContextFile]) -> int:
        if not self._prefix_alone:
            return self.count_segments(self.format.segments(rel, prefix, suffix, pieces))
        # As `CompletionService` encodes it: the prefix on its own (`PromptFormat.around_prefix`). In a format with
        # no control token before the prefix ("plain"), counting it joined to the file header merged tokens across.
        before, after = self.format.around_prefix(rel, suffix, pieces)
        return self.count_segments(before) + (self.count(prefix) if prefix else 0) + self.count_segments(after)

    # ---- the request -----------------------------------------------------------------------------
    def pack(
        self,
        path: str,
        prefix: str,
        suffix: str = "",
        budget_tokens: int | None = None,
        open_files: Mapping[str, str] | Iterable[str] | None = None,
        extra: Sequence[ContextFile] = (),
    ) -> PackResult:
        """Context pieces, trimmed prefix and suffix for a completion at the end of `prefix` in `path`.

        `open_files` are editor buffers ({path: text}, overriding the disk) or just paths, most recently focused
        first; `extra` are pieces the client sends (always preferred, secret-looking ones dropped).
        """
        t0 = time.perf_counter()
        cfg = self.config
        rel = self._relative(path)
        open_paths = self._sync_open_files(open_files, rel)
        t_sync = time.perf_counter()
        query = src.Query.build(rel, language_of(rel), prefix, suffix, open_paths, cfg)
        candidates = self._pinned(extra) + (self.rank(query) if self.index is not None else [])
        t_rank = time.perf_counter()
        result = self._fit(rel, prefix, suffix, budget_tokens, candidates, query.window)
        t_fit = time.perf_counter()
        result.timings_ms = {
            "sync": 1e3 * (t_sync - t0), "rank": 1e3 * (t_rank - t_sync), "fit": 1e3 * (t_fit - t_rank),
            "total": 1e3 * (t_fit - t0),
        }
        return result

    def file_fits(self, path: str, prefix: str, suffix: str, budget: int) -> bool:
        """Whether the whole file, prefix and suffix uncut and no context, would fit `budget` tokens (counted line
        by line, as trimming counts). When it would, a trimmed prefix or suffix is the packer's choice, room made
        for project context (`prefix_share`, `suffix_share`), not text the window could not hold."""
        rel = self._relative(path)
        lines = split_lines(prefix) + (split_lines(suffix) if self.format.supports_suffix else [])
        return self._fixed_tokens(rel) + self._lines.join_ratio * sum(map(self._lines, lines)) <= budget

    def _fixed_tokens(self, rel: str) -> int:
        """Tokens of the prompt's fixed parts for a file at `rel` (markers, its path), counted once per path."""
        overhead = self._overhead.get(rel)
        if overhead is None:
            overhead = self._overhead[rel] = self._count_prompt(rel, "", "", [])
        return overhead

    def _relative(self, path: str) -> str:
        if self.index is None:
            return str(path)
        rel = self.index.relative(path)
        return rel if rel is not None else str(path)

    def _sync_open_files(self, open_files, current: str) -> list[str]:
        if self.index is None:
            return []
        paths, buffers = [], set()
        items = open_files.items() if isinstance(open_files, Mapping) else ((p, None) for p in open_files or ())
        for path, text in items:
            rel = self.index.relative(path)
            if rel is None:
                continue
            # The current file's buffer changes on every keystroke and is never its own context: not re-indexed.
            if text is not None and rel != current:
                self.index.update(rel, text)  # no-op when the buffer equals what the index holds
                buffers.add(rel)
            paths.append(rel)
        # A buffer the editor no longer sends was closed, perhaps unsaved: the disk's text is the project again.
        for rel in self._buffers - buffers - {current}:
            entry = self.index.files.get(rel)
            if entry is not None and entry.from_buffer:
                self.index.update(rel)
        self._buffers = buffers
        return paths

    def _pinned(self, extra: Sequence[ContextFile]) -> list[Candidate]:
        """Client-sent pieces rank above every retrieved one, in the order given (first = most relevant)."""
        out = []
        for i, piece in enumerate(extra):
            if is_secret(piece.path, piece.text):
                continue
            out.append(Candidate(("extra", i, piece.path), piece.path, piece.text, 1.0 + (len(extra) - i), ("extra",)))
        return out

    # ---- ranking ---------------------------------------------------------------------------------
    def rank(self, query: src.Query, retry: bool = True) -> list[Candidate]:
        """Chunks of the project, best first, from reciprocal-rank fusion of the enabled sources."""
        cfg, index = self.config, self.index
        enabled = set(cfg.sources)
        file_lists: dict[str, list[str]] = {}
        if "open" in enabled:
            file_lists["open"] = src.open_files(index, query)
        if "recent" in enabled:
            file_lists["recent"] = src.recent_files(index, query, cfg.recent_files)
        if "path" in enabled:
            file_lists["path"] = src.path_distance(index, query, cfg.path_files)
        if "imports" in enabled:
            file_lists["imports"] = src.imported_files(index, query, cfg.import_files, cfg.import_scan_chars)
        rankings: dict[str, list[int]] = {name: self._head_chunks(paths) for name, paths in file_lists.items()}
        lexical = index.lexical(query.near_idents) if {"bm25", "jaccard"} & enabled else None
        if "bm25" in enabled:
            rankings["bm25"] = [cid for cid, _ in src.bm25_chunks(index, query, cfg.bm25_top_k, lexical)]
        if "jaccard" in enabled:
            # Cody's window-similarity retriever over the files the other sources point at.
            pool: dict[str, None] = {}
            for paths in file_lists.values():
                pool.update(dict.fromkeys(paths))
            for cid in rankings.get("bm25", [])[:16]:
                pool.setdefault(index.chunks[cid].path, None)
            pool.pop(query.path, None)
            paths = list(pool)[: cfg.jaccard_max_files]
            rankings["jaccard"] = [cid for cid, _ in src.jaccard_chunks(index, query, paths, cfg.jaccard_top_k, lexical)]
        if "definitions" in enabled:
            rankings["definitions"] = src.definition_chunks(index, query, cfg)
        out = []
        fresh: dict[str, bool] = {}  # one stat per file and request
        for cid, score, names in fuse(rankings, cfg.source_weights, cfg.rrf_k):
            chunk = index.chunks[cid]
            if chunk is None or chunk.path == query.path:
                continue
            # A file changed or deleted on disk since it was indexed is re-read (or dropped): its old chunks are not
            # the project any more, and a long-running server hears of such edits only here.
            if chunk.path not in fresh:
                fresh[chunk.path] = index.fresh(chunk.path)
            if not fresh[chunk.path] or index.chunks[cid] is None:
                continue
            out.append(Candidate(cid, chunk.path, chunk.text, score, names, chunk.start_line))
            if len(out) >= cfg.max_candidates:
                break
        if retry and not all(fresh.values()):
            return self.rank(query, retry=False)  # once more over the re-read files (their new chunks)
        return out

    def _head_chunks(self, paths: list[str]) -> list[int]:
        """A file-level source's ranking expanded to chunks: each file's first chunks, file by file."""
        out = []
        for rel in paths:
            entry = self.index.files.get(rel)
            if entry is not None:
                out.extend(entry.chunk_ids[: self.config.file_source_chunks])
        return out

    # ---- fitting the budget ----------------------------------------------------------------------
    def _count_once(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            n = self._memo[text] = self.count(text)
        return n

    def _fit(self, rel: str, prefix: str, suffix: str, budget: int | None, candidates: list[Candidate], window: str) -> PackResult:
        cfg, fmt = self.config, self.format
        self._memo.clear()
        count = self._count_once
        budget = cfg.prompt_budget if budget is None else int(budget)
        overhead = self._fixed_tokens(rel)
        avail = budget - overhead
        if avail <= 0:
            raise ValueError(f"token budget {budget} is too small: the prompt's fixed parts alone take {overhead}")
        prefix_t, n_prefix = trim_prefix(prefix, min(avail, int(cfg.prefix_share * budget)), count, self._lines)
        if fmt.supports_suffix:
            cap = min(avail - n_prefix, int(cfg.suffix_share * budget))
            suffix_t, n_suffix = trim_suffix(suffix, cap, count, self._lines)
        else:
            suffix_t, n_suffix = "", 0
        room = avail - n_prefix - n_suffix
        if cfg.max_context_tokens is not None:
            room = min(room, cfg.max_context_tokens)
        chosen, used = self._choose(candidates, room, window)
        # Tokens the context left unused go back to the prefix, then the suffix.
        spare = avail - n_prefix - n_suffix - used
        if spare >= cfg.min_piece_tokens and len(prefix_t) < len(prefix):
            prefix_t, n_prefix = trim_prefix(prefix, n_prefix + spare, count, self._lines)
            spare = avail - n_prefix - n_suffix - used
        if spare >= cfg.min_piece_tokens and len(suffix_t) < len(suffix) and fmt.supports_suffix:
            suffix_t, n_suffix = trim_suffix(suffix, n_suffix + spare, count, self._lines)
        pieces = self._order(rel, chosen)
        if self._additive:  # every part sits between special tokens: the parts' counts are the prompt's
            total = overhead + n_prefix + n_suffix + sum(p.tokens for p in pieces)
        else:
            total = self._count_prompt(rel, prefix_t, suffix_t, pieces)
        # Token counts of parts need not add up exactly (merges across part boundaries): enforce the budget on the
        # rendered whole, dropping the least relevant piece, then prefix lines, until it fits.
        while total > budget:
            excess = total - budget
            if pieces:
                pieces.pop(min(range(len(pieces)), key=lambda i: pieces[i].score))
            elif prefix_t:
                prefix_t, n_prefix = trim_prefix(prefix_t, max(0, n_prefix - excess), self.count, self._lines)
            elif suffix_t:
                suffix_t, n_suffix = trim_suffix(suffix_t, max(0, n_suffix - excess), self.count, self._lines)
            else:
                raise ValueError(f"token budget {budget} is too small for this prompt format and path")
            total = self._count_prompt(rel, prefix_t, suffix_t, pieces)
        self._memo.clear()
        self._last_order[rel] = [(p.path, p.text) for p in pieces]
        return PackResult(pieces, prefix_t, suffix_t, total, budget, n_prefix, n_suffix, sum(p.tokens for p in pieces))

    def _choose(self, candidates: list[Candidate], room: int, window: str) -> tuple[list[ContextPiece], int]:
        cfg = self.config
        cursor_lines = line_set(window)
        kept: list[Candidate] = []
        chosen: list[ContextPiece] = []
        used = 0
        for cand in candidates[: cfg.max_candidates]:
            if len(chosen) >= cfg.max_pieces or room - used < cfg.min_piece_tokens:
                break
            tokens = self._tokens.known(cand.path, cand.text)
            # Count only chunks whose estimated size fits: counting is most of a request's cost.
            estimate = tokens if tokens is not None else 0.8 * (len(cand.text) + len(cand.path)) / self._tokens.chars_per_token
            if used + estimate > room or redundant(cand, kept, cursor_lines, cfg.duplicate_jaccard, cfg.cursor_overlap):
                continue
            if tokens is None:
                tokens = self._tokens.block(self.format, cand.path, cand.text)
            if used + tokens > room:
                continue  # a smaller, less relevant chunk may still fit
            kept.append(cand)
            chosen.append(ContextPiece(cand.path, cand.text, cand.score, tokens, cand.sources, cand.start_line))
            used += tokens
        return chosen, used

    def _order(self, rel: str, chosen: list[ContextPiece]) -> list[ContextPiece]:
        """Least relevant first, most relevant last; with `stable_order`, pieces already in this file's previous
        prompt keep their place at the front so that the prompt's start (and the engine's cache) is unchanged."""
        ascending = sorted(chosen, key=lambda p: p.score)
        if not self.config.stable_order:
            return ascending
        previous = {key: i for i, key in enumerate(self._last_order.get(rel, []))}
        kept = sorted((p for p in ascending if (p.path, p.text) in previous), key=lambda p: previous[(p.path, p.text)])
        return kept + [p for p in ascending if (p.path, p.text) not in previous]


_SPECIAL = re.compile(r"<\|?[a-z_]+\|?>")


def _counts_add_up(fmt: PromptFormat, count_segments: CountSegments) -> bool:
    """Do a prompt's token counts add up over its parts? True when each template starts with a control token, the
    FIM template separates prefix and suffix by one, and the counter reads each template's control token as one
    token (as a tokenizer that splits off special tokens before anything else does): then no token spans two parts
    and the packer can skip counting the whole prompt again."""
    if fmt.order == "plain":
        return False
    templates = (fmt.context_file, fmt.current_file, fmt.fim)
    if not all(_SPECIAL.match(t) for t in templates):
        return False
    between = fmt.fim[min(fmt.fim.index("{prefix}"), fmt.fim.index("{suffix}")) : max(fmt.fim.index("{prefix}"), fmt.fim.index("{suffix}"))]
    if not _SPECIAL.search(between) or not fmt.fim.rstrip().endswith(">"):
        return False
    specials = {m for t in templates for m in _SPECIAL.findall(t)}
    return all(count_segments([("literal", token)]) == 1 for token in specials)


# ---- trimming ------------------------------------------------------------------------------------
class LineCosts:
    """Token counts of single lines, remembered: typing changes one line, so a keystroke recounts one line."""

    def __init__(self, count: CountTokens, size: int = 200_000):
        self.count = count
        self.size = size
        self.join_ratio = 1.0  # tokens of joined lines / sum of their own counts, learnt from exact counts
        self._cache: dict[str, int] = {}

    def __call__(self, line: str) -> int:
        n = self._cache.get(line)
        if n is None:
            if len(self._cache) >= self.size:
                self._cache.clear()
            n = self._cache[line] = self.count(line)
        return n


def trim_prefix(prefix: str, cap: int, count: CountTokens, costs: LineCosts | None = None) -> tuple[str, int]:
    """The longest tail of `prefix` made of whole lines (or, if the cursor line alone is too long, of characters)
    that costs at most `cap` tokens, and its token count."""
    return _trim(prefix, cap, count, True, costs)


def trim_suffix(suffix: str, cap: int, count: CountTokens, costs: LineCosts | None = None) -> tuple[str, int]:
    """The longest head of `suffix` made of whole lines that costs at most `cap` tokens, and its token count."""
    return _trim(suffix, cap, count, False, costs)


def _trim(text: str, cap: int, count: CountTokens, from_top: bool, costs: LineCosts | None) -> tuple[str, int]:
    if cap <= 0 or not text:
        return "", 0
    lines = split_lines(text)  # whole lines as the editor sees them, not cut at a form feed or U+2028
    if from_top:
        lines.reverse()  # lines[0] is the one at the cursor
    costs = costs or LineCosts(count)
    cum = [0]
    for line in lines:
        cum.append(cum[-1] + len(line))

    def take(k: int) -> str:
        return text[len(text) - cum[k] :] if from_top else text[: cum[k]]

    # Per-line counts find the cut (a line's tokens rarely change when lines are joined, and joining only ever
    # merged tokens in our checks); one count of the joined text makes the number exact, then fills any slack.
    k, total = 0, 0
    for line in lines:
        c = costs(line)
        if (total + c) * costs.join_ratio > cap:
            break
        total += c
        k += 1
    if k == len(lines):
        n = count(text)
        if n <= cap:
            return text, n
    best_k, best_n = 0, 0
    first = True
    while k > 0:
        n = count(take(k))
        if first and total:
            costs.join_ratio = min(1.5, max(0.5, 0.8 * costs.join_ratio + 0.2 * n / total))
            first = False
        if n <= cap:
            best_k, best_n = k, n
            # Joined lines usually cost a little less than their sum: add whole lines while their sum, scaled by
            # what joining saved so far, fits in what is left (one more count confirms).
            ratio = n / max(total, 1)
            extra, grow = 0, k
            while grow < len(lines) and n + (extra + costs(lines[grow])) * ratio <= cap:
                extra += costs(lines[grow])
                grow += 1
            if grow == k:
                break
            k, total = grow, total + extra
        else:
            if best_k:
                break
            k -= max(1, (n - cap) * k // max(n, 1))  # drop about as many lines as the overshoot
    if best_k > 0:
        return take(best_k), best_n
    # Not even the cursor line fits: keep the characters nearest the cursor.
    line = lines[0]
    lo, hi = 0, len(line)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(line[-mid:] if from_top else line[:mid]) <= cap:
            lo = mid
        else:
            hi = mid - 1
    piece = (line[-lo:] if from_top else line[:lo]) if lo else ""
    return piece, count(piece) if piece else 0


# ---- given chunks (CrossCodeEval) ------------------------------------------------------------------
def pack_chunks(
    chunks: Sequence[Any],
    count_tokens: CountTokens,
    budget: int,
    cursor_window: str = "",
    prompt_format: str | PromptFormat = "mellum",
    config: ContextConfig | None = None,
    count_segments: CountSegments | None = None,
) -> list[ContextPiece]:
    """Pack an already ranked chunk list (best first) under `budget` tokens of rendered context blocks.

    Blocks are counted as `ContextPacker` counts them: by `count_segments` over their segments when given, else
    by `count_tokens` over the rendered text.

    Each chunk is a mapping with `retrieved_chunk` or `text`, `filename` or `path`, and optional `score`
    (CrossCodeEval's `crossfile_context.list`), or a `ContextFile`. Exact and near duplicates and chunks
    repeating `cursor_window` are dropped; the result is ordered most relevant last.
    """
    cfg = config or ContextConfig()
    fmt = get_format(prompt_format) if isinstance(prompt_format, str) else prompt_format
    cands = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, ContextFile):
            path, text, score = chunk.path, chunk.text, getattr(chunk, "score", None)
        else:
            path = chunk.get("filename", chunk.get("path"))
            text = chunk.get("retrieved_chunk", chunk.get("text"))
            score = chunk.get("score")
            if path is None or text is None:
                raise ValueError(f"chunk {i} needs 'filename'/'path' and 'retrieved_chunk'/'text'; has {sorted(chunk)}")
        if is_secret(path, text):
            continue
        # Rank decides; the given score is kept for reports (CrossCodeEval's BM25 scores are not comparable across tasks).
        rank_score = 1.0 / (cfg.rrf_k + i + 1)
        cands.append(Candidate(("chunk", i), path, text, rank_score if score is None else float(score), ("given",), i))
    cursor_lines = line_set(cursor_window)
    kept: list[Candidate] = []
    pieces: list[ContextPiece] = []
    used = 0
    for cand in cands:
        if len(pieces) >= cfg.max_pieces:
            break
        if redundant(cand, kept, cursor_lines, cfg.duplicate_jaccard, cfg.cursor_overlap):
            continue
        block = fmt.context_segments([ContextFile(cand.path, cand.text)])
        tokens = count_segments(block) if count_segments else count_tokens("".join(s for _, s in block))
        if used + tokens > budget:
            continue
        kept.append(cand)
        pieces.append(ContextPiece(cand.path, cand.text, cand.score, tokens, cand.sources, cand.start_line))
        used += tokens
    pieces.reverse()  # best (first given) last, nearest the cursor
    return pieces
