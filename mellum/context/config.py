"""Budgets and knobs of project context: one dataclass, every size in tokens, lines, bytes or milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field

# Directories and files never worth indexing (gitignore syntax), on top of each project's .gitignore.
DEFAULT_IGNORE: tuple[str, ...] = (
    ".git/", ".hg/", ".svn/", "node_modules/", "__pycache__/", ".venv/", "venv/", ".tox/", ".nox/",
    ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".idea/", ".gradle/", "target/", "build/", "dist/",
    "*.egg-info/", "site-packages/", ".next/", "vendor/bundle/", "*.pyc", "*.class", "*.o", "*.so", "*.dll",
    "*.min.js", "*.min.css", "*.map", "*_pb2.py", "*_pb2_grpc.py", "*.pb.go", "package-lock.json",
    "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Cargo.lock", "go.sum",
)


@dataclass
class ContextConfig:
    """How the project index discovers files and how the packer spends the prompt's token budget.

    The packer's budget is `window_tokens - max_new_tokens` unless a request passes its own. Of that, the
    prefix may take up to `prefix_share` and the suffix up to `suffix_share` (trimmed from the top and the
    bottom respectively); context files get what the prefix and suffix leave, capped by `max_context_tokens`.
    """

    # ---- prompt budget (tokens) ----
    window_tokens: int = 8192  # Mellum's context (REFERENCE.md §1)
    max_new_tokens: int = 128
    prefix_share: float = 0.4  # most of the prompt the prefix may use; Continue keeps 30% (REFERENCE.md §3)
    suffix_share: float = 0.15  # Continue caps the suffix at 20%
    max_context_tokens: int | None = None  # None: whatever prefix and suffix leave
    max_pieces: int = 32
    max_candidates: int = 96  # ranked candidates considered for packing (each costs a token count once)
    min_piece_tokens: int = 16  # stop packing when less room than this is left
    prompt_format: str = "mellum"  # set from the model config's `prompt_format` by the caller
    verify_total: bool | None = None  # count the whole prompt again (None: only when parts' counts may not add up)

    # ---- discovery ----
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    extra_ignore: tuple[str, ...] = ()
    use_gitignore: bool = True
    max_file_bytes: int = 512_000  # "huge" files are skipped
    max_files: int = 50_000
    max_line_chars: int = 1_000  # a file whose average line is longer is minified/generated
    languages: tuple[str, ...] | None = None  # None: every language the index knows

    # ---- chunking ----
    chunk_lines: int = 24  # a chunk ends after this many lines...
    min_chunk_lines: int = 8  # ...or at a definition once it has this many
    max_chunk_chars: int = 4_000

    # ---- candidate sources ----
    cursor_window_lines: int = 30  # lines around the cursor that queries the lexical sources (prefix side)
    cursor_suffix_lines: int = 10  # of those, from the suffix side
    path_files: int = 8  # nearest files by directory distance
    recent_files: int = 10  # last edited files (Cody uses the 10 last edited, REFERENCE.md §3)
    import_files: int = 16
    import_scan_chars: int = 32_768  # imports are parsed from the current file's head only
    file_source_chunks: int = 6  # chunks taken from the top of each file named by a file-level source
    bm25_top_k: int = 64
    jaccard_top_k: int = 64
    jaccard_max_files: int = 24
    definition_names: int = 24  # identifiers nearest the cursor whose definitions are looked up
    max_defs_per_name: int = 4  # names defined in more places than this are too ambiguous to help
    max_term_share: float = 0.05  # query terms found in more chunks than this share are skipped (cost, not signal)
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    sources: tuple[str, ...] = ("open", "recent", "path", "imports", "jaccard", "bm25", "definitions")
    source_weights: dict[str, float] = field(
        default_factory=lambda: {
            "open": 1.0, "recent": 0.8, "path": 0.6, "imports": 1.0, "jaccard": 1.0, "bm25": 1.0, "definitions": 1.2,
        }
    )

    # ---- ranking ----
    rrf_k: int = 60  # reciprocal-rank fusion constant (Cormack, Clarke & Büttcher, SIGIR 2009)
    duplicate_jaccard: float = 0.8  # a chunk this similar to one already chosen is a near-duplicate
    cursor_overlap: float = 0.5  # a chunk sharing this share of its lines with the cursor window repeats it
    stable_order: bool = True  # keep pieces of the previous request in place (the engine's prefix cache hits)

    # ---- incremental index ----
    rebuild_after_updates: int = 256  # compact postings after this many file updates

    def __post_init__(self) -> None:
        if self.window_tokens <= 0 or self.max_new_tokens < 0 or self.max_new_tokens >= self.window_tokens:
            raise ValueError(
                f"window_tokens ({self.window_tokens}) must exceed max_new_tokens ({self.max_new_tokens}) and both be positive"
            )
        for name in ("prefix_share", "suffix_share"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if self.prefix_share + self.suffix_share > 1.0:
            raise ValueError("prefix_share + suffix_share must not exceed 1")
        if self.min_chunk_lines < 1 or self.chunk_lines < self.min_chunk_lines:
            raise ValueError("need 1 <= min_chunk_lines <= chunk_lines")
        unknown = set(self.sources) - set(self.source_weights)
        if unknown:
            raise ValueError(f"unknown context sources {sorted(unknown)}; known: {sorted(self.source_weights)}")

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may use: the window less the tokens reserved for generation."""
        return self.window_tokens - self.max_new_tokens
