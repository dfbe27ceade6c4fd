"""License governance: SPDX expressions from package metadata and license texts, a source file's SPDX tags, and
an allowlist policy.

The Mellum papers train on "permissively licensed code only". A project is kept when its license expression is
satisfied by the allowlist: an OR needs one allowed alternative, an AND needs all parts allowed. Unknown
licenses are excluded. Several license classifiers on one distribution are combined with AND (conservative:
projects listing e.g. "BSD" and "GPL" often ship parts under each). A file's own `SPDX-License-Identifier` tags
decide its license. License notices in prose live in `mellum.data.notices`, REUSE projects in `mellum.data.reuse`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from functools import lru_cache

# The default allowlist (SPDX ids); configurable per build.
PERMISSIVE: frozenset[str] = frozenset(
    {
        "MIT", "MIT-0", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "ISC", "PSF-2.0", "Python-2.0",
        "Unlicense", "0BSD", "Zlib", "BSL-1.0", "CC0-1.0", "X11", "NCSA", "HPND", "UPL-1.0", "BlueOak-1.0.0",
        "CNRI-Python", "MIT-CMU",
    }
)

# Trove classifier → SPDX id. Generic "BSD License" is refined by the license file when one is found.
CLASSIFIERS: dict[str, str] = {
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: MIT No Attribution License (MIT-0)": "MIT-0",
    "License :: OSI Approved :: BSD License": "BSD-3-Clause",
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: ISC License (ISCL)": "ISC",
    "License :: OSI Approved :: Python Software Foundation License": "PSF-2.0",
    "License :: OSI Approved :: zlib/libpng License": "Zlib",
    "License :: OSI Approved :: Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "License :: OSI Approved :: The Unlicense (Unlicense)": "Unlicense",
    "License :: OSI Approved :: Universal Permissive License (UPL)": "UPL-1.0",
    "License :: OSI Approved :: Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "License :: CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
    "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "License :: OSI Approved :: Mozilla Public License 1.1 (MPL 1.1)": "MPL-1.1",
    "License :: OSI Approved :: GNU General Public License v2 (GPLv2)": "GPL-2.0-only",
    "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "License :: OSI Approved :: GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)": "GPL-3.0-or-later",
    "License :: OSI Approved :: GNU General Public License (GPL)": "GPL-3.0-or-later",
    "License :: OSI Approved :: GNU Lesser General Public License v2 (LGPLv2)": "LGPL-2.0-only",
    "License :: OSI Approved :: GNU Lesser General Public License v2 or later (LGPLv2+)": "LGPL-2.0-or-later",
    "License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "License :: OSI Approved :: GNU Lesser General Public License v3 or later (LGPLv3+)": "LGPL-3.0-or-later",
    "License :: OSI Approved :: GNU Library or Lesser General Public License (LGPL)": "LGPL-2.1-or-later",
    "License :: OSI Approved :: GNU Affero General Public License v3": "AGPL-3.0-only",
    "License :: OSI Approved :: GNU Affero General Public License v3 or later (AGPLv3+)": "AGPL-3.0-or-later",
    "License :: OSI Approved :: Eclipse Public License 2.0 (EPL-2.0)": "EPL-2.0",
    "License :: Public Domain": "LicenseRef-Public-Domain",
    "License :: OSI Approved :: Zero-Clause BSD (0BSD)": "0BSD",
    "License :: OSI Approved :: Blue Oak Model License (BlueOak-1.0.0)": "BlueOak-1.0.0",
    "License :: OSI Approved :: Python License (CNRI Python License)": "CNRI-Python",
    "License :: OSI Approved :: University of Illinois/NCSA Open Source License": "NCSA",
}
# Classifiers that name no license ("License :: OSI Approved" alone); any other unmapped license classifier is
# an unknown license (e.g. "License :: Other/Proprietary License", EUPL): beside a known one it must not vanish.
GENERIC_CLASSIFIERS = frozenset({"License :: OSI Approved", "License :: DFSG approved"})
UNKNOWN_CLASSIFIER = "LicenseRef-Unknown-Classifier"

# Free-text `License:` metadata values people write → SPDX (lower-cased, punctuation-normalised keys).
SHORT_NAMES: dict[str, str] = {
    "mit": "MIT", "mit license": "MIT", "the mit license": "MIT", "expat": "MIT",
    "bsd": "BSD-3-Clause", "bsd license": "BSD-3-Clause", "new bsd": "BSD-3-Clause", "new bsd license": "BSD-3-Clause",
    "bsd-3": "BSD-3-Clause", "3-clause bsd": "BSD-3-Clause", "bsd 3-clause": "BSD-3-Clause", "modified bsd": "BSD-3-Clause",
    "bsd-2": "BSD-2-Clause", "2-clause bsd": "BSD-2-Clause", "simplified bsd": "BSD-2-Clause", "freebsd": "BSD-2-Clause",
    "apache": "Apache-2.0", "apache 2.0": "Apache-2.0", "apache-2": "Apache-2.0", "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0", "apache software license": "Apache-2.0", "asl 2": "Apache-2.0",
    "apache license version 2.0": "Apache-2.0", "apache 2": "Apache-2.0", "apache2": "Apache-2.0",
    "isc": "ISC", "isc license": "ISC", "psf": "PSF-2.0", "psfl": "PSF-2.0", "python": "PSF-2.0",
    "python software foundation license": "PSF-2.0", "zlib": "Zlib", "unlicense": "Unlicense", "public domain": "LicenseRef-Public-Domain",
    "gpl": "GPL-3.0-or-later", "gplv2": "GPL-2.0-only", "gplv3": "GPL-3.0-only", "gpl-3": "GPL-3.0-only",
    "lgpl": "LGPL-2.1-or-later", "lgplv3": "LGPL-3.0-only", "mpl-2": "MPL-2.0", "mpl 2.0": "MPL-2.0",
}

# The expression runs to the first character no SPDX expression has: a comment closer (`*/`, `-->`), a docstring's
# or string's quote, `#`, `;`, `,`. Anchoring at the end of the line instead would miss a header written as
# `"""SPDX-License-Identifier: GPL-3.0-only"""` and let the file in under the project license.
_SPDX_HEADER = re.compile(r"SPDX-License-Identifier:[ \t]*([A-Za-z0-9.+\-():]+(?:[ \t]+[A-Za-z0-9.+\-():]+)*)")


# License tags and notices are read from a file's head only: a notice is about the file it opens, while the same
# words further down are code or prose (a license detector's phrase tables, a docstring quoting the GPL).
HEAD_LINES = 30
HEAD_CHARS = 8_000


def head(text: str) -> str:
    """A file's head: its first HEAD_LINES lines, at most HEAD_CHARS characters."""
    return "\n".join(text[:HEAD_CHARS].split("\n", HEAD_LINES)[:HEAD_LINES])


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[*#/\"'`]|^\s*//", " ", text.lower())).strip()


# License texts by content: (spdx, phrases that must all occur, phrases that must not occur). First match by
# position in the file wins, so a LICENSE that appends the licenses of bundled code is judged by its own text.
_TEXT_RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("AGPL-3.0-or-later", ("gnu affero general public license",), ()),
    ("LGPL-3.0-or-later", ("gnu lesser general public license", "version 3"), ()),
    ("LGPL-2.1-or-later", ("gnu lesser general public license",), ()),
    ("LGPL-2.0-or-later", ("gnu library general public license",), ()),
    ("GPL-3.0-or-later", ("gnu general public license", "version 3"), ()),
    ("GPL-2.0-or-later", ("gnu general public license",), ()),
    ("MPL-2.0", ("mozilla public license", "2.0"), ()),
    ("Apache-2.0", ("apache license", "version 2.0"), ()),
    ("PSF-2.0", ("python software foundation license",), ()),
    ("PSF-2.0", ("psf license agreement",), ()),
    # NCSA reuses MIT's grant sentence without its notice clause, which made it MIT-0 (numpy/random's LICENSE.md).
    ("NCSA", ("ncsa open source license",), ()),
    ("MIT", ("permission is hereby granted, free of charge, to any person obtaining a copy",
             "the above copyright notice and this permission notice shall be included"), ()),
    ("MIT-0", ("permission is hereby granted, free of charge, to any person obtaining a copy",), ()),
    ("BSD-4-Clause", ("redistribution and use in source and binary forms", "all advertising materials mentioning"), ()),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name"), ()),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "names of its contributors may not be used"), ()),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "may not be used to endorse or promote"), ()),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",), ()),
    ("ISC", ("permission to use, copy, modify, and", "distribute this software for any purpose with or without fee is hereby granted",
             "provided that the above copyright notice and this permission notice appear in all copies"), ()),
    ("0BSD", ("permission to use, copy, modify, and", "distribute this software for any purpose with or without fee is hereby granted"), ()),
    ("Unlicense", ("this is free and unencumbered software released into the public domain",), ()),
    ("Zlib", ("altered source versions must be plainly marked as such",
              "this notice may not be removed or altered from any source distribution"), ()),
    ("BSL-1.0", ("boost software license",), ()),
    ("CC0-1.0", ("cc0 1.0 universal",), ()),
    ("EPL-2.0", ("eclipse public license",), ()),
)
TEXT_IDS: frozenset[str] = frozenset(spdx for spdx, _, _ in _TEXT_RULES)  # what `detect_text` can recognise


def detect_text(text: str) -> str | None:
    """The SPDX id of a license text (LICENSE/COPYING file), by content; None when not recognised."""
    norm = _norm(text[:200_000])
    best: tuple[int, str] | None = None
    for spdx, required, forbidden in _TEXT_RULES:
        positions = [norm.find(p) for p in required]
        if min(positions) < 0 or any(f in norm for f in forbidden):
            continue
        where = min(positions)
        if best is None or where < best[0]:
            best = (where, spdx)
    return best[1] if best else None


def spdx_header(text: str) -> str | None:
    """The `SPDX-License-Identifier:` expression in the first HEAD_LINES lines of a source file, if any. Several
    tags (REUSE writes one per license) are combined with AND: taking the first let `MIT` hide a `GPL-3.0-only`."""
    found: list[str] = []
    for m in _SPDX_HEADER.finditer(head(text)):
        expression = m.group(1).rstrip("-").strip()  # the dashes of an HTML `-->` closer are not part of it
        if expression and expression not in found:
            found.append(expression)
    return conjoin(found)


def conjoin(expressions: list[str | None]) -> str | None:
    """Expressions that all apply, as one, each term once: [`MIT`, `MIT AND (CC0-1.0 OR X11)`] → `MIT AND (CC0-1.0
    OR X11)`; None for none. A single expression is returned as written."""
    given = list(dict.fromkeys(e.strip() for e in expressions if e and e.strip()))
    if len(given) <= 1:
        return given[0] if given else None
    terms = list(dict.fromkeys(term for e in given for term in _and_terms(e)))
    return " AND ".join(f"({t})" if " " in t else t for t in terms) if len(terms) > 1 else terms[0]


def _and_terms(expression: str) -> list[str]:
    from license_expression import AND

    try:
        node = licensing().parse(expression, validate=False)
    except Exception:
        return [expression]
    return [str(arg) for arg in node.args] if isinstance(node, AND) else [str(node)]


def from_metadata(meta: Message) -> tuple[str | None, str]:
    """(SPDX expression, where it came from) from a distribution's METADATA headers."""
    expression = meta.get("License-Expression")
    if expression and expression.strip():
        return expression.strip(), "License-Expression"
    short = (meta.get("License") or "").strip()
    if short and "\n" not in short and len(short) < 80:
        key = re.sub(r"\s+", " ", short.lower().replace("licence", "license")).strip(" .")
        if key in SHORT_NAMES:
            return SHORT_NAMES[key], "License"
        if is_spdx(short):
            return short, "License"
    named = [c.strip() for c in meta.get_all("Classifier") or [] if c.strip().startswith("License ::")]
    classifiers = [CLASSIFIERS[c] for c in named if c in CLASSIFIERS]
    if classifiers:
        # AND over all of them, conservatively: an unmapped one (proprietary, EUPL...) keeps the project out.
        classifiers += [UNKNOWN_CLASSIFIER for c in named if c not in CLASSIFIERS and c not in GENERIC_CLASSIFIERS]
        unique = sorted(set(classifiers))
        return " AND ".join(unique) if len(unique) > 1 else unique[0], "classifiers"
    if short:  # a full license text pasted into the License field
        found = detect_text(short)
        if found:
            return found, "License text"
    return None, "none"


@lru_cache(maxsize=1)
def licensing():
    """license_expression's SPDX licensing (its symbol table is built once per process)."""
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def is_spdx(expression: str) -> bool:
    """True when every symbol of the expression is a known SPDX license id."""
    try:
        return not licensing().validate(expression).errors
    except Exception:
        return False


@dataclass(frozen=True)
class LicensePolicy:
    """Which licenses may enter the corpus: an allowlist of SPDX ids (exceptions like `WITH` are ignored)."""

    allow: frozenset[str] = field(default_factory=lambda: PERMISSIVE)
    _seen: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)  # asked per file

    def allows(self, expression: str | None) -> bool:
        if not expression:
            return False
        if expression not in self._seen:
            self._seen[expression] = self._allows(expression)
        return self._seen[expression]

    def _allows(self, expression: str) -> bool:
        try:
            parsed = licensing().parse(expression, validate=False)
        except Exception:
            return expression.strip() in self.allow
        return self._eval(parsed)

    def _eval(self, node) -> bool:
        from license_expression import AND, OR, LicenseWithExceptionSymbol

        if isinstance(node, AND):
            return all(self._eval(a) for a in node.args)
        if isinstance(node, OR):
            return any(self._eval(a) for a in node.args)
        if isinstance(node, LicenseWithExceptionSymbol):
            return self._eval(node.license_symbol)
        key = getattr(node, "key", str(node))
        return key in self.allow or key.lower() in {a.lower() for a in self.allow}


@lru_cache(maxsize=4096)
def normalize(expression: str) -> str:
    """Canonical SPDX spelling of an expression (e.g. 'mit or apache-2.0' → 'MIT OR Apache-2.0'); a blank one stays
    blank (the parser's None was spelled "None": a dep5 paragraph without a License became that license)."""
    try:
        parsed = licensing().parse(expression, validate=False)
    except Exception:
        return expression.strip()
    return str(parsed) if parsed is not None else expression.strip()
