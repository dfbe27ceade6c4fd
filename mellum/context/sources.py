"""Candidate sources of project context: each is cheap, independent, and returns a ranked list.

File-level sources (open and recently edited files, path distance, imports) rank paths; chunk-level sources
(Jaccard over identifier bags, BM25, definitions of identifiers near the cursor) rank chunk ids of the index.
The ranker fuses them (rank.py); none of them knows about tokens or prompts.
"""

from __future__ import annotations

import posixpath
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from mellum.context.config import ContextConfig
from mellum.context.index import IDENTIFIER, STOPWORDS, Lexical, ProjectIndex, top_chunks


@dataclass
class Query:
    """What the sources see of one request: the current file, the text around the cursor, open files."""

    path: str  # root-relative posix path of the current file
    language: str | None
    prefix: str
    suffix: str
    open_paths: list[str]  # root-relative, most recently focused first
    window: str  # the cursor window: last lines of the prefix and first lines of the suffix
    near_idents: list[str]  # identifiers of the window, nearest to the cursor first

    @classmethod
    def build(cls, path: str, language: str | None, prefix: str, suffix: str, open_paths: list[str], config: ContextConfig) -> "Query":
        before = _last_lines(prefix, config.cursor_window_lines)
        after = _first_lines(suffix, config.cursor_suffix_lines)
        seen: dict[str, None] = {}
        for word in reversed(IDENTIFIER.findall(before)):
            seen.setdefault(word, None)
        for word in IDENTIFIER.findall(after):
            seen.setdefault(word, None)
        idents = [w for w in seen if len(w) > 1 and w not in STOPWORDS]
        return cls(path, language, prefix, suffix, open_paths, before + after, idents)


def _last_lines(text: str, n: int) -> str:
    cut = len(text)
    for _ in range(n):
        cut = text.rfind("\n", 0, cut)
        if cut < 0:
            return text
    return text[cut + 1 :]


def _first_lines(text: str, n: int) -> str:
    cut = -1
    for _ in range(n):
        cut = text.find("\n", cut + 1)
        if cut < 0:
            return text
    return text[: cut + 1]


# ---- file-level sources ------------------------------------------------------------------------------
def open_files(index: ProjectIndex, query: Query) -> list[str]:
    """Files open in the editor, most recently focused first."""
    return [p for p in query.open_paths if p != query.path and p in index.files]


def recent_files(index: ProjectIndex, query: Query, n: int) -> list[str]:
    """Files changed most recently in the editor or on disk (through `ProjectIndex.update`)."""
    return [p for p in index.recent(n + 1) if p != query.path][:n]


def path_distance(index: ProjectIndex, query: Query, n: int) -> list[str]:
    """The `n` files nearest the current one in the directory tree; same language first among equals.

    Distance counts directory steps up and down between the two folders (JetBrains' context-composer
    study orders files by path distance, REFERENCE.md §3).
    """
    here = posixpath.dirname(query.path)
    here_parts = here.split("/") if here else []
    ranked = []
    for folder in index.directories():
        parts = folder.split("/") if folder else []
        common = 0
        for a, b in zip(here_parts, parts):
            if a != b:
                break
            common += 1
        ranked.append((len(here_parts) + len(parts) - 2 * common, folder))
    ranked.sort()
    out: list[str] = []
    for _, folder in ranked:
        files = [p for p in index.files_in_dir(folder) if p != query.path]
        files.sort(key=lambda p: (index.files[p].language != query.language, p))
        out.extend(files[: n - len(out)])
        if len(out) >= n:
            break
    return out


_import_cache: dict[tuple[str, str], list[str]] = {}


def imported_files(index: ProjectIndex, query: Query, n: int, scan_chars: int = 32_768) -> list[str]:
    """Project files the current file imports, in import order (parsed with tree-sitter).

    Only the first `scan_chars` characters are parsed (imports live at the top; a big file costs a parse per
    keystroke otherwise), and the parse is reused while they do not change.
    """
    head = (query.prefix + query.suffix[: max(0, scan_chars - len(query.prefix))])[:scan_chars]
    key = (query.path, head)
    targets = _import_cache.get(key)
    if targets is None:
        targets = parse_imports(head, query.language or "")
        if len(_import_cache) > 64:
            _import_cache.clear()
        _import_cache[key] = targets
    out: dict[str, None] = {}
    for target in targets:
        for rel in resolve_import(index, query.path, query.language or "", target):
            if rel != query.path:
                out.setdefault(rel, None)
        if len(out) >= n:
            break
    return list(out)[:n]


# ---- chunk-level sources -----------------------------------------------------------------------------
def jaccard_chunks(index: ProjectIndex, query: Query, paths: list[str], top_k: int, lexical: Lexical | None = None) -> list[tuple[int, float]]:
    """Chunks of the given files ranked by Jaccard similarity of identifier sets with the cursor window
    (Sourcegraph Cody's retriever over open tabs and recent files, REFERENCE.md §3)."""
    lexical = lexical or index.lexical(query.near_idents)
    ids = [cid for rel in paths if rel in index.files and rel != query.path for cid in index.files[rel].chunk_ids]
    return top_chunks(lexical.jaccard, top_k, only=ids)


def bm25_chunks(index: ProjectIndex, query: Query, top_k: int, lexical: Lexical | None = None) -> list[tuple[int, float]]:
    """Chunks of the whole project ranked by BM25 of the cursor window's identifiers."""
    lexical = lexical or index.lexical(query.near_idents)
    exclude = index.files[query.path].chunk_ids if query.path in index.files else ()
    return top_chunks(lexical.bm25, top_k, exclude=exclude)


def definition_chunks(index: ProjectIndex, query: Query, config: ContextConfig) -> list[int]:
    """Chunks defining identifiers used near the cursor (nearest usage first), in other files of the project.

    Names defined in more than `max_defs_per_name` places (`run`, `__init__`) are skipped as ambiguous.
    """
    out: dict[int, None] = {}
    looked = 0
    for name in query.near_idents:
        if looked >= config.definition_names:
            break
        if name.startswith("__"):
            continue
        places = [p for p in index.definitions_of(name) if p[0] != query.path]
        if not places:
            continue
        looked += 1
        if len(places) > config.max_defs_per_name:
            continue
        for rel, line in places:
            chunk = index.chunk_at(rel, line)
            if chunk is not None:
                out.setdefault(chunk.id, None)
    return list(out)


# ---- imports -----------------------------------------------------------------------------------------
_TS_MODULES = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "java": ("tree_sitter_java", "language"),
    "kotlin": ("tree_sitter_kotlin", "language"),
    "go": ("tree_sitter_go", "language"),
}
# Statement nodes that may hold imports further down (imports inside `if`, `try`, functions, classes).
_CONTAINERS = {
    "block", "if_statement", "try_statement", "function_definition", "class_definition", "with_statement",
    "else_clause", "elif_clause", "except_clause", "finally_clause", "decorated_definition", "import_list",
    "statement_block", "program", "module", "source_file",
}
_IMPORT_NODES = {
    "python": {"import_statement", "import_from_statement"},
    "javascript": {"import_statement", "export_statement", "lexical_declaration", "variable_declaration", "expression_statement"},
    "java": {"import_declaration"},
    "kotlin": {"import", "import_header"},
    "go": {"import_declaration"},
}
_IMPORT_NODES["typescript"] = _IMPORT_NODES["tsx"] = _IMPORT_NODES["javascript"]
# The TypeScript sources an emitted JavaScript name stands for (TypeScript's module resolution, "node16"/"bundler").
_TS_SOURCES = {".js": (".ts", ".tsx"), ".jsx": (".tsx",), ".mjs": (".mts",), ".cjs": (".cts",)}
_STRING = re.compile(r"""["'`]([^"'`\n]+)["'`]""")
_REQUIRE = re.compile(r"""\b(?:require|import)\s*\(\s*["'`]([^"'`\n]+)["'`]""")


_local = threading.local()  # tree-sitter parsers are not shared between threads


def _parser(language: str):
    """This thread's tree-sitter parser for a language, or None when its grammar package is missing."""
    parsers = getattr(_local, "parsers", None)
    if parsers is None:
        parsers = _local.parsers = {}
    if language not in parsers:
        parsers[language] = _new_parser(language)
    return parsers[language]


@lru_cache(maxsize=None)
def _grammar(language: str):
    import importlib

    import tree_sitter

    spec = _TS_MODULES[language]
    return tree_sitter.Language(getattr(importlib.import_module(spec[0]), spec[1])())


def _new_parser(language: str):
    if language not in _TS_MODULES:
        return None
    try:
        import tree_sitter

        return tree_sitter.Parser(_grammar(language))
    except ImportError:
        return None


def parse_imports(text: str, language: str) -> list[str]:
    """Import targets named by a file, in order: dotted modules (Python, Java, Kotlin; Python relative imports
    keep their leading dots), module specifiers (JS/TS) or import paths (Go). Unknown languages give []."""
    parser = _parser(language)
    if parser is None:
        return []
    tree = parser.parse(text.encode("utf-8"))
    kinds = _IMPORT_NODES[language]
    out: list[str] = []

    def walk(node) -> None:  # statements only, in document order; expressions are never entered
        for child in node.children:
            if child.type in kinds:
                out.extend(_import_targets(child, language))
            elif child.type in _CONTAINERS or (language == "python" and child.type.endswith("_statement")):
                walk(child)

    walk(tree.root_node)
    return out


def _import_targets(node, language: str) -> list[str]:
    text = node.text.decode("utf-8", "replace")
    if language == "python":
        if node.type == "import_statement":
            return [n.text.decode() for n in _names(node)]
        module = node.child_by_field_name("module_name")
        base = module.text.decode() if module is not None else ""
        names = [n.text.decode() for n in _names(node)]
        # `from pkg import mod` may name submodules: offer pkg.mod before pkg itself.
        return [f"{base}{'' if base.endswith('.') else '.'}{n}" for n in names] + [base]
    if language in ("javascript", "typescript", "tsx"):
        if node.type in ("import_statement", "export_statement"):
            found = _STRING.findall(text)
            return found[-1:] if "from" in text or node.type == "import_statement" else []
        return _REQUIRE.findall(text)
    if language in ("java", "kotlin"):
        body = re.sub(r"^\s*import\s+(static\s+)?|\s+as\s+\w+\s*$|;", "", text).strip()
        return [body.replace(" ", "")]
    if language == "go":
        return _STRING.findall(text)
    return []


def _names(node):
    """The dotted names an import statement imports (aliases resolved to what they alias)."""
    for child in node.children_by_field_name("name"):
        if child.type == "aliased_import":
            inner = child.child_by_field_name("name")
            yield inner if inner is not None else child
        else:
            yield child


def resolve_import(index: ProjectIndex, path: str, language: str, target: str) -> list[str]:
    """Project files an import target refers to (empty for third-party or unresolved imports)."""
    here = posixpath.dirname(path)
    if language == "python":
        dots = len(target) - len(target.lstrip("."))
        module = target[dots:].replace(".", "/")
        if dots:
            base = here
            for _ in range(dots - 1):
                base = posixpath.dirname(base)
            stem = posixpath.join(base, module) if module else base
            return [p for p in (f"{stem}.py", f"{stem}/__init__.py") if p in index.files]
        if not module:
            return []
        found = index.files_ending_with(f"{module}.py") or index.files_ending_with(f"{module}/__init__.py")
        return _nearest(found, here)[:2]
    if language in ("javascript", "typescript", "tsx"):
        if not target.startswith("."):
            return []
        stem = posixpath.normpath(posixpath.join(here, target))
        for suffix in ("", ".ts", ".tsx", ".mts", ".cts", ".js", ".jsx", ".mjs", ".cjs", "/index.ts", "/index.tsx",
                       "/index.js"):
            if stem + suffix in index.files:
                return [stem + suffix]
        # TypeScript under ES modules imports the emitted name (`./util.js`) of a source file `util.ts`.
        base, ext = posixpath.splitext(stem)
        for source in _TS_SOURCES.get(ext, ()):
            if base + source in index.files:
                return [base + source]
        return []
    if language in ("java", "kotlin"):
        ext = ".java" if language == "java" else ".kt"
        parts = target.split(".")
        if parts[-1] == "*":
            tail = "/".join(parts[:-1])
            # `import static com.x.Consts.*` takes the members of a class (a file); `import com.x.model.*` a package.
            owner = index.files_ending_with(tail + ext)
            if owner:
                return _nearest(owner, here)[:2]
            return [p for p in _folder_files(index, tail) if p.endswith(ext)][:8]
        while len(parts) > 1:  # com.x.Y.member → com/x/Y
            found = index.files_ending_with("/".join(parts) + ext)
            if found:
                return _nearest(found, here)[:2]
            parts = parts[:-1]
        if language == "kotlin":  # Kotlin files need not be named after their classes
            name = target.split(".")[-1]
            return sorted({p for p, _ in index.definitions_of(name) if p.endswith((".kt", ".kts"))})[:2]
        return []
    if language == "go":
        parts = target.split("/")
        for k in range(len(parts)):  # module path → the longest tail that is a folder of the project
            folder = "/".join(parts[k:])
            files = [p for p in _folder_files(index, folder) if p.endswith(".go") and not p.endswith("_test.go")]
            if files:
                return files[:8]
        return []
    return []


def _folder_files(index: ProjectIndex, folder: str) -> list[str]:
    direct = index.files_in_dir(folder)
    if direct:
        return direct
    return [p for d in index.directories() if d.endswith("/" + folder) for p in index.files_in_dir(d)]


def _nearest(paths: list[str], here: str) -> list[str]:
    """Paths sorted by how many leading folders they share with `here` (most first), then by name."""
    def shared(p: str) -> int:
        return len(posixpath.commonprefix([p.split("/")[:-1], here.split("/")]))

    return sorted(paths, key=lambda p: (-shared(p), p))
