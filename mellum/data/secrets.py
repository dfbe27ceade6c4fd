"""Secret redaction: API keys, tokens, private keys and passwords in code are replaced by placeholders, counted by kind.

Patterns follow the public formats of each provider (as detect-secrets and gitleaks list them); password-like
assignments are redacted only when the value looks random (length ≥ 8, Shannon entropy ≥ `min_entropy` bits per
character), so `password = "password"` or `token = get_token()` stay. A cheap substring pre-check skips the
regular expressions on files that cannot contain a match (most of them).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

# kind → (pattern, literal hints of which at least one must occur in the text for the pattern to be tried)
_PATTERNS: dict[str, tuple[str, tuple[str, ...]]] = {
    # The body may hold only what a key written into code holds (base64, headers such as `Proc-Type: 4,ENCRYPTED`,
    # `\n` escapes, quotes of concatenated string lines) and never `-----`: a lazy "anything up to END" ran from a
    # BEGIN marker constant to the END constant and deleted the code between them (cryptography's
    # `_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"` / `_SK_END = ...`), and from a marker mentioned in code
    # across a second BEGIN to the END of a real key. `_private_key` then asks the body for real key material.
    "PRIVATE_KEY": (
        r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----(?P<body>(?:[A-Za-z0-9+/=\s\"'\\,:()]|-(?!----))*)"
        r"(?:-----END (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----)?",
        ("PRIVATE KEY",),
    ),
    "AWS_ACCESS_KEY": (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", ("AKIA", "ASIA")),
    "GITHUB_TOKEN": (r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    "SLACK_TOKEN": (r"\bxox[abposr]-[A-Za-z0-9-]{10,72}\b", ("xox",)),
    "GOOGLE_API_KEY": (r"\bAIza[0-9A-Za-z_\-]{35}\b", ("AIza",)),
    "OPENAI_KEY": (r"\bsk-(?:proj-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}\b|\bsk-[A-Za-z0-9]{48}\b", ("sk-",)),
    "HF_TOKEN": (r"\bhf_[A-Za-z0-9]{34}\b", ("hf_",)),  # letters and digits: `hf_[A-Za-z]{34}` missed most real tokens
    "STRIPE_KEY": (r"\b[sr]k_live_[0-9A-Za-z]{20,99}\b", ("_live_",)),
    "JWT": (r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b", ("eyJ",)),
}
_KEY_MATERIAL = re.compile(r"[A-Za-z0-9+/=]+")
_KEY_GAP = re.compile(r"(?:\s|\\|[\"'])*")  # between two key lines: a newline, its `\n` escape, string quotes
# name = "value" / name: 'value' / NAME=value (config files), where name says it is a secret. Found in two steps
# (keyword, then the assignment after it) because one pattern with a leading name class is ~50x slower.
_KEYWORD = re.compile(
    r"password|passwd|pwd|secret[_\-]?key|secret|api[_\-]?key|access[_\-]?key|auth[_\-]?token|private[_\-]?key|token"
)
_ASCII_LOWER = {c: c + 32 for c in range(65, 91)}
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ASSIGNMENT_TAIL = re.compile(
    r"""(?x)
    [0-9]*  # the name ends with the keyword (token_type is not a secret), maybe numbered
    (?P<sep>["']?[ \t]*[:=][ \t]*)
    (?P<quote>["']?)
    (?P<value>[A-Za-z0-9+/=_\-!@\#$%^&*.~]{8,200})
    (?P=quote)
    """
)


@dataclass(frozen=True)
class SecretsConfig:
    min_entropy: float = 3.0  # bits per character of a password-like value before it counts as a secret
    placeholder: str = "<{kind}>"  # what replaces a secret; {kind} is e.g. AWS_ACCESS_KEY, PASSWORD


def _entropy(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


class SecretRedactor:
    """`redact(text) -> (text, Counter of kinds)`; compiled once, reused for every file."""

    def __init__(self, config: SecretsConfig | None = None):
        self.config = config or SecretsConfig()
        self._compiled = {kind: (re.compile(p), hints) for kind, (p, hints) in _PATTERNS.items()}

    def redact(self, text: str) -> tuple[str, Counter]:
        found: Counter = Counter()
        for kind, (pattern, hints) in self._compiled.items():
            if not any(h in text for h in hints):
                continue
            if kind == "PRIVATE_KEY":
                text = pattern.sub(lambda m: self._private_key(m, found), text)
                continue
            text, n = pattern.subn(self._placeholder(kind), text)
            if n:
                found[kind] += n
        return self._redact_assignments(text, found), found

    def _private_key(self, m: re.Match, found: Counter) -> str:
        """A PEM block with key material → placeholder; markers that only mention a key (docs, parsers) stay."""
        body = m.group("body")
        runs = list(_KEY_MATERIAL.finditer(body))
        if not any(len(r.group()) >= 32 for r in runs):  # real key lines are 64 base64 characters
            return m.group(0)
        found["PRIVATE_KEY"] += 1
        if m.end() > m.end("body"):  # the whole block, END marker included
            return self._placeholder("PRIVATE_KEY")
        # No END marker (a truncated key): redact the key lines — the first long run and the runs that continue
        # it after a full line — and keep the code that follows.
        start = next(i for i, r in enumerate(runs) if len(r.group()) >= 32)
        end = runs[start].end()
        for prev, run in zip(runs[start:], runs[start + 1 :]):
            if len(prev.group()) < 60 or not _KEY_GAP.fullmatch(body, prev.end(), run.start()):
                break
            end = run.end()
        return self._placeholder("PRIVATE_KEY") + body[end:]

    def _redact_assignments(self, text: str, found: Counter) -> str:
        lowered = text.lower()
        if len(lowered) != len(text):  # a few non-ASCII characters change length when lower-cased
            lowered = text.translate(_ASCII_LOWER)
        pieces, last, pos = [], 0, 0
        while True:
            k = _KEYWORD.search(lowered, pos)
            if k is None:
                break
            pos = k.end()
            m = _ASSIGNMENT_TAIL.match(text, k.end())
            if m is None:
                continue
            name_start = k.start()
            while name_start > last and text[name_start - 1] in _NAME_CHARS:
                name_start -= 1
            replacement = self._assignment(text[name_start : m.start("sep")], m, found)
            if replacement is not None:
                pieces.append(text[last:name_start])
                pieces.append(replacement)
                last = pos = m.end()
        pieces.append(text[last:])
        return "".join(pieces)

    def _placeholder(self, kind: str) -> str:
        return self.config.placeholder.format(kind=kind)

    def _assignment(self, name: str, m: re.Match, found: Counter) -> str | None:
        """The redacted assignment, or None to leave it alone."""
        value = m.group("value")
        if not m.group("quote") and not re.search(r"[0-9]", value):
            return None  # unquoted words are identifiers (password=password_input), not secrets
        if not m.group("quote") and value.isidentifier() and m.string[m.end() : m.end() + 1] in ("(", "[", ",", ")"):
            return None  # a name used in code: `private_key: PKCS7PrivateKeyTypes,`, `self.to_token = Sam2Attention(c)`
        if "public" in name.lower():
            return None  # publicKeyToken, public_token: published by design
        if re.fullmatch(r"[a-z]+(?:[-_][a-z]+)+", value):
            return None  # lower-case words are placeholders and messages: "your-api-key", "no-password-required"
        if _entropy(value) < self.config.min_entropy or value.isidentifier() and value.islower():
            return None
        mixed = re.search(r"[A-Za-z]", value) and re.search(r"[0-9!@#$%^&*+/=~]", value)
        if not mixed and not (len(value) >= 20 and _entropy(value) >= 3.5):
            return None  # words-with-dashes and plain names are not secrets
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", value):
            return None  # dotted names: os.environ, self.config.token
        if re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", value):
            return None  # constant or environment-variable names: AWS_SESSION_TOKEN
        kind = "PASSWORD" if re.search(r"(?i)pass|pwd", name) else "SECRET"
        found[kind] += 1
        q = m.group("quote")
        return f"{name}{m.group('sep')}{q}{self._placeholder(kind)}{q}"
