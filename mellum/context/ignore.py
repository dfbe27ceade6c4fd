"""Which project files may become context: gitignore rules, secret-looking files, and languages by extension."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterable

LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascript", ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".java": "java", ".kt": "kotlin", ".kts": "kotlin", ".go": "go", ".rs": "rust", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp", ".rb": "ruby",
    ".php": "php", ".swift": "swift", ".scala": "scala", ".lua": "lua", ".sh": "shell", ".bash": "shell",
    ".sql": "sql", ".html": "html", ".css": "css", ".scss": "css", ".vue": "vue", ".md": "markdown",
    ".rst": "rst", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json", ".xml": "xml",
    ".gradle": "groovy", ".groovy": "groovy", ".proto": "proto", ".dart": "dart", ".r": "r", ".jl": "julia",
}


def language_of(path: str) -> str | None:
    """The language of a file by its extension (None: not a file the index keeps)."""
    return LANGUAGES.get(PurePosixPath(path).suffix.lower())


# ---- secrets ---------------------------------------------------------------------------------------
# Names of files that hold credentials rather than code. Matched on the file name, lower-cased.
_SECRET_NAMES = re.compile(
    r"""^(
        \.env(\..*)?                                 # .env, .env.local, .env.production ...
      | .*\.(pem|key|p12|pfx|jks|keystore|kdbx|ppk|asc|gpg|crt|cer|der|p8)
      | id_(rsa|dsa|ecdsa|ed25519)(\.pub)?
      | \.netrc | _netrc | \.pgpass | \.npmrc | \.pypirc | \.git-credentials | \.htpasswd | \.dockercfg
      | credentials(\.(json|ya?ml|toml|ini|xml|txt|csv))? | .*credentials\.json
      | secrets?\.(json|ya?ml|toml|ini|env|txt|properties)
      | client_secret.*\.json | service[-_]account.*\.json | .*\.tfvars | terraform\.tfstate(\.backup)?
    )$""",
    re.VERBOSE,
)
# Content that marks a file as secret whatever its name (checked on the first bytes; cheap).
_SECRET_CONTENT = re.compile(
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{36}\b|\bxox[baprs]-[A-Za-z0-9-]{10,}"
)


def is_secret(path: str, text: str | None = None) -> bool:
    """True for files that look like credentials: by name (.env, keys, credential stores) or by content."""
    if _SECRET_NAMES.match(PurePosixPath(path).name.lower()):
        return True
    return bool(text) and _SECRET_CONTENT.search(text[:200_000]) is not None


# ---- gitignore -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool  # matched against the path relative to `base`, else against the name alone
    base: str  # directory holding the .gitignore ('' for the root and for configured patterns)


def _glob_to_regex(glob: str) -> str:
    """Translate one gitignore glob (without leading '/' or trailing '/') to a regular expression."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**/", i) and (i == 0 or glob[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i) and i + 2 == n and (i == 0 or glob[i - 1] == "/"):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = glob.find("]", i + 2)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = glob[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def parse_rules(lines: Iterable[str], base: str = "") -> list[_Rule]:
    """Rules from the lines of a .gitignore in directory `base` (relative, posix; '' for the root)."""
    rules = []
    for raw in lines:
        line = raw.rstrip("\n").rstrip("\r")
        if not line.endswith("\\ "):
            line = line.rstrip(" ")
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        elif line.startswith("\\"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line  # a slash anywhere but the end anchors the pattern to its .gitignore
        line = line.lstrip("/")
        try:
            regex = re.compile(_glob_to_regex(line))
        except re.error:  # a malformed pattern (`[z-a]`) matches nothing in git; one bad line must not stop the index
            continue
        rules.append(_Rule(regex, negate, dir_only, anchored, base))
    return rules


class IgnoreRules:
    """Ordered gitignore rules; the last matching rule decides (git's semantics, deeper files later)."""

    def __init__(self, rules: Iterable[_Rule] = ()):
        self.rules: list[_Rule] = list(rules)

    def extended(self, rules: Iterable[_Rule]) -> "IgnoreRules":
        return IgnoreRules([*self.rules, *rules])

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Is the path `rel` (posix, relative to the root) ignored? Parents are not checked: walkers prune them."""
        name = rel.rsplit("/", 1)[-1]
        verdict = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.base:
                if not rel.startswith(rule.base + "/"):
                    continue
                sub = rel[len(rule.base) + 1 :]
            else:
                sub = rel
            if (rule.regex.fullmatch(sub) if rule.anchored else rule.regex.fullmatch(name)) is not None:
                verdict = not rule.negate
        return verdict

    def ignored_path(self, rel: str) -> bool:
        """Is a file ignored, itself or through any of its parent directories?"""
        parts = rel.split("/")
        for k in range(1, len(parts)):
            if self.ignored("/".join(parts[:k]), is_dir=True):
                return True
        return self.ignored(rel, is_dir=False)
