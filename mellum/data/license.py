"""License governance: SPDX expressions from package metadata, license texts and file headers, and an allowlist policy.

The Mellum papers train on "permissively licensed code only". A project is kept when its license expression is
satisfied by the allowlist: an OR needs one allowed alternative, an AND needs all parts allowed. Unknown
licenses are excluded. Several license classifiers on one distribution are combined with AND (conservative:
projects listing e.g. "BSD" and "GPL" often ship parts under each). The files of a REUSE project
(https://reuse.software) are licensed one by one by the spec's rules (`Reuse`: REUSE.toml, .reuse/dep5, `.license`
companions, SPDX tags), each `LICENSES/` text checked against its name. A file's own head decides its license:
`SPDX-License-Identifier` tags, else a license notice (MPL's Exhibit A, the GNU licenses' boilerplate), and a NOTICE
file may credit files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from functools import cached_property, lru_cache

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


def _head(text: str) -> str:
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
    for m in _SPDX_HEADER.finditer(_head(text)):
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
        node = _licensing().parse(expression, validate=False)
    except Exception:
        return [expression]
    return [str(arg) for arg in node.args] if isinstance(node, AND) else [str(node)]


# ---- license notices: prose in a file's head, or a NOTICE file crediting files -------------------------------

# A notice names the license after its own verb: "licensed under", "released under", "under the terms of", "subject
# to". A bare name is not a notice (`RULES = ["gnu general public license"]`, "see the GNU GPL for details").
_NOTICE_VERB = (r"(?:(?:licen[sc]ed|released|distributed|made available|available|provided)\s+under"
                r"|under\s+the\s+terms\s+of|subject\s+to)\s+"
                r"(?:the\s+)?(?:terms\s+(?:and\s+conditions\s+)?of\s+(?:the\s+)?)?")
# License names in prose, the more specific first; the id is completed by the version that follows.
_NOTICE_NAMES: tuple[tuple[str, str], ...] = (
    ("AGPL", r"gnu\s+affero\s+general\s+public\s+licen[sc]e|agpl"),
    ("LGPL", r"gnu\s+lesser\s+general\s+public\s+licen[sc]e|lgpl"),
    ("LGPL-2.0", r"gnu\s+library\s+general\s+public\s+licen[sc]e"),
    ("GPL", r"gnu\s+general\s+public\s+licen[sc]e|gnu\s+gpl|gpl"),
    ("MPL", r"mozilla\s+public\s+licen[sc]e|mpl"),
    ("EPL", r"eclipse\s+public\s+licen[sc]e|epl"),
    ("CDDL", r"common\s+development\s+and\s+distribution\s+licen[sc]e|cddl"),
    ("EUPL", r"european\s+union\s+public\s+licen[sc]e|eupl"),
    ("Apache", r"apache\s+licen[sc]e|apache"),
    ("MIT", r"mit\s+licen[sc]e|mit"),
)
_NAME = "|".join(f"(?P<n{i}>{pattern})" for i, (_, pattern) in enumerate(_NOTICE_NAMES))
_NOTICE = re.compile(rf"\b{_NOTICE_VERB}(?:{_NAME})(?![a-uw-z0-9])", re.IGNORECASE)
# The version right after the name ("GPLv2", "MPL-2.0", "License, v. 2.0", "License, Version 2.0") or, for the GNU
# licenses, anywhere in the notice's sentence ("... as published by the FSF; either version 3 of the License").
_VERSION_AFTER = re.compile(r"[\s,]*(?:v(?:ersion)?\.?\s*|-)?(\d+(?:\.\d+)?)(\+)?", re.IGNORECASE)
_VERSION_IN = re.compile(r"\bversion\s+(\d+(?:\.\d+)?)\b", re.IGNORECASE)
_LATER = re.compile(r"any\s+later\s+version|or\s+later", re.IGNORECASE)
_DEFAULT_VERSION = {"AGPL": "3.0", "LGPL": "2.1", "LGPL-2.0": "2.0", "GPL": "3.0", "MPL": "2.0", "EPL": "2.0",
                    "CDDL": "1.0", "EUPL": "1.2", "Apache": "2.0"}


def _notice_id(family: str, after: str) -> str:
    """The SPDX id of a license named in a notice, from its family and the text after the name."""
    if family == "MIT":
        return "MIT"
    sentence = re.split(r"\.(?:\s|$)", after, maxsplit=1)[0]
    m = _VERSION_AFTER.match(after)
    gnu = family in ("AGPL", "LGPL", "LGPL-2.0", "GPL")
    if m is None and gnu:
        m = _VERSION_IN.search(sentence)
    version = m.group(1) if m else _DEFAULT_VERSION[family]
    version = version if "." in version else f"{version}.0"
    if not gnu:
        return f"{family}-{version}"
    later = m is None or bool(_LATER.search(sentence)) or bool(m.re is _VERSION_AFTER and m.group(2))
    return f"{family.split('-')[0]}-{version}-{'or-later' if later else 'only'}"


def _notices(text: str) -> list[str]:
    found = []
    for m in _NOTICE.finditer(text):
        if re.search(r"\brest\s+of\b[^.]*$", text[max(0, m.start() - 80) : m.start()], re.IGNORECASE):
            continue  # about the other files: "The rest of Valgrind is licensed under the GPL" (valgrind.h is BSD)
        family = next(_NOTICE_NAMES[i][0] for i in range(len(_NOTICE_NAMES)) if m.group(f"n{i}"))
        found.append(_notice_id(family, text[m.end() : m.end() + 200]))
    return found


def notice_header(text: str) -> str | None:
    """The license a prose notice in a file's first HEAD_LINES lines puts the file under (MPL's Exhibit A, the GNU
    "either version 2 of the License, or (at your option) any later version", Apache's "Licensed under the Apache
    License, Version 2.0"), several combined with AND; None when the head has no notice."""
    head = re.sub(r"\s+", " ", re.sub(r"^[ \t]*(?:#+|//+|/?\*+/?|--+|;+|%+|!|rem\b)", " ", _head(text), flags=re.M))
    return conjoin(list(dict.fromkeys(_notices(head))))


_CREDITED = re.compile(r"`([\w./-]+\.\w+)`")


def notice_credits(text: str) -> dict[str, str]:
    """Files a NOTICE file credits to another license, by the name it writes in backquotes: setuptools'

        - `extra_validations.py` and `format.py`, `error_reporting.py`:
            - project: `validate-pyproject` - licensed under MPL-2.0

    A credit runs from a line naming files to the next such line or blank line; a license it names but this module
    cannot tell is LicenseRef-Unknown-Notice (the file is kept out, not passed off as the project's)."""
    credits: dict[str, str] = {}
    block: list[str] = []
    for line in text.split("\n") + [""]:
        if (block and _CREDITED.search(line)) or not line.strip():
            _credit(block, credits)
            block = []
        if line.strip() and (block or _CREDITED.search(line)):
            block.append(line)
    return credits


def _credit(block: list[str], credits: dict[str, str]) -> None:
    if not block:
        return
    names = [n for n in _CREDITED.findall(block[0]) if not n.startswith("/") and ".." not in n.split("/")]
    joined = re.sub(r"\s+", " ", " ".join(block))
    m = re.search(r"(?:licen[sc]ed|released|distributed|available)\s+under\s+(?:the\s+)?(?P<rest>.*)", joined, re.I)
    if m is None or not names:
        return
    token = re.match(r"[A-Za-z0-9.+-]+(?: (?:WITH|OR|AND) [A-Za-z0-9.+-]+)*", m.group("rest"))
    spdx = normalize(token.group(0).rstrip(".")) if token and is_spdx(token.group(0).rstrip(".")) else None
    if spdx is None:
        named = _notices(m.group(0))
        spdx = named[0] if named else SHORT_NAMES.get(m.group("rest").split(",")[0].split("(")[0].strip(" .").lower())
    for name in names:
        credits[name] = spdx or "LicenseRef-Unknown-Notice"


# ---- REUSE (https://reuse.software): LICENSES/<SPDX id>.<ext>, REUSE.toml, .reuse/dep5 -------------------------

_TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".markdown", ".html", ".htm")
UNVERIFIED = "LicenseRef-Unverified-{}"  # a LICENSES/ file whose text is not the license its name says


def _family(spdx: str) -> str:
    # License texts do not say "only" or "or later" (the notice in each file does), so text detection cannot.
    return re.sub(r"(?:-only|-or-later|\+)$", "", spdx)


_LICENSE_REF = re.compile(r"LicenseRef-[A-Za-z0-9.-]+")


def _reuse_name(name: str) -> str:
    for extension in _TEXT_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def spdx_named(name: str) -> bool:
    """Whether a file name is an SPDX id (`MIT.txt`, `LLVM-exception.txt`, `LicenseRef-Corp.txt`): a `LICENSES/`
    folder holding one is REUSE's. Other projects keep bundled licenses there (pandas: `NUMPY_LICENSE`, `OTHER`)."""
    spdx = _reuse_name(name)
    return spdx.lower() in _licensing().known_symbols_lowercase or bool(_LICENSE_REF.fullmatch(spdx))


def reuse_ids(name: str, text: str) -> list[str]:
    """The licenses a file of a REUSE `LICENSES/` folder stands for: its SPDX id, by its name, checked against its
    text where this module recognises texts. A text that is another license adds that license; a text that is no
    license this module knows, under the name of one it does, adds an unverified marker (unknown: excluded). An
    exception (`LLVM-exception.txt`) adds nothing: it only applies `WITH` a license. A name that is no SPDX id
    stands for an unknown license."""
    spdx = _reuse_name(name)
    symbol = _licensing().known_symbols_lowercase.get(spdx.lower())
    if symbol is not None and symbol.is_exception:
        return []
    if symbol is None:
        return [spdx if _LICENSE_REF.fullmatch(spdx) else
                "LicenseRef-Unknown-" + (re.sub(r"[^A-Za-z0-9.-]+", "-", spdx).strip("-.") or "Name")]
    spdx = normalize(spdx)
    found = detect_text(text)
    if found is not None and _family(found) != _family(spdx):
        return [spdx, found]
    if found is None and _family(spdx) in {_family(rule[0]) for rule in _TEXT_RULES}:
        return [spdx, UNVERIFIED.format(spdx)]
    return [spdx]


# A file's REUSE licensing (spec 3.3, "Order of precedence" and "REUSE.toml"): a `<file>.license` companion stands in
# for the file's own head; a .reuse/dep5 paragraph is aggregated with it; a REUSE.toml table applies as its
# precedence says. https://reuse.software/spec-3.3/
_PRECEDENCE = ("closest", "aggregate", "override")


@dataclass(frozen=True)
class Annotation:
    """A REUSE.toml `[[annotations]]` table or a .reuse/dep5 `Files` paragraph: the license it gives the files its
    globs match (paths relative to its file's folder; the AND of its `SPDX-License-Identifier`s, None for none) and
    its precedence: "closest" (REUSE.toml's default), "aggregate" (every dep5 paragraph) or "override"."""

    paths: re.Pattern
    license: str | None
    precedence: str = "closest"

    def matches(self, rel: str) -> bool:
        return self.paths.fullmatch(rel) is not None


def _glob(pattern: str, dep5: bool = False) -> str:
    # REUSE.toml: `*` is anything but `/`, `**` and `**/` anything (as the reference tool reads them), `\` takes the
    # next character as is. dep5 (Debian copyright format 1.0): `*` is anything, `/` included, and `?` one character.
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if pattern[i] == "*" and not dep5:
            star = 3 if pattern.startswith("**/", i) else 2 if pattern.startswith("**", i) else 1
            out.append("[^/]*" if star == 1 else ".*")
            i += star
            continue
        out.append(".*" if pattern[i] == "*" else "." if pattern[i] == "?" and dep5 else re.escape(pattern[i]))
        i += 1
    return "".join(out)


def _annotation(globs: list[str], licenses: list[str], precedence: str, dep5: bool = False) -> Annotation:
    paths = re.compile("|".join(f"(?:{_glob(g, dep5)})" for g in globs))
    return Annotation(paths, conjoin([normalize(e) for e in licenses]), precedence)


def reuse_toml(text: str) -> list[Annotation]:
    """The annotations of a REUSE.toml. One that cannot be read (bad TOML, a table without `path`, an unknown
    precedence) stands for an unknown license aggregated over every file below it: whatever it meant, it is unknown."""
    import tomllib

    unreadable = [_annotation(["**"], ["LicenseRef-Unreadable-REUSE.toml"], "aggregate")]
    try:
        tables = tomllib.loads(text).get("annotations", [])
    except tomllib.TOMLDecodeError:
        return unreadable
    found = []
    for table in tables if isinstance(tables, list) else [None]:
        if not isinstance(table, dict):
            return unreadable
        paths, licenses = _strings(table.get("path")), _strings(table.get("SPDX-License-Identifier"))
        precedence = table.get("precedence", "closest")
        if not paths or licenses is None or precedence not in _PRECEDENCE:
            return unreadable
        found.append(_annotation(paths, licenses, precedence))
    return found


def _strings(value) -> list[str] | None:
    if value is None or isinstance(value, str):
        return [value] if value else []
    return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def reuse_dep5(text: str) -> list[Annotation]:
    """The `Files` paragraphs of a .reuse/dep5, in order: each aggregates its `License` (the field's first line; the
    lines after it are license text) with what a file says of itself."""
    found = []
    for paragraph in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        fields: dict[str, str] = {}
        name = None
        for line in paragraph.split("\n"):
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and name:
                fields[name] += "\n" + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                fields[name] = value.strip()
        if fields.get("files", "").split():
            synopsis = fields.get("license", "").split("\n")[0].strip()
            found.append(_annotation(fields["files"].split(), [synopsis], "aggregate", dep5=True))
    return found


@dataclass
class Reuse:
    """The licensing of the files of one REUSE project (or of a folder copied into a project with REUSE files of its
    own), by the spec's rules; paths are relative to its root.

    A file's license is what REUSE declares for it: override tables, aggregate tables and dep5 paragraphs, and its own
    (its `.license` companion's tags, else its head's tags; neither under an override), else the closest table's.
    A file REUSE declares nothing for gets `fallback`. Either way, an id whose `LICENSES/` text turned out to be
    another license, or none this module knows (`reuse_ids`), brings that along."""

    licenses: list[list[str]] = field(default_factory=list)  # `reuse_ids` of each LICENSES/ file
    tomls: dict[str, list[Annotation]] = field(default_factory=dict)  # REUSE.toml's folder ("." the root) → tables
    dep5: list[Annotation] = field(default_factory=list)
    companions: dict[str, str | None] = field(default_factory=dict)  # file with a `<file>.license` → its tags
    stated: str | None = None  # what the project states besides (its LICENSE file; a distribution's metadata)

    def license_of(self, rel: str, tags: str | None = None) -> str | None:
        """The license of the file at `rel`, given the SPDX tags of its head."""
        return self._verified(self.declared(rel, tags) or self.fallback)

    def declared(self, rel: str, tags: str | None = None) -> str | None:
        """What REUSE declares for a file, given its head's SPDX tags; None for nothing."""
        override, aggregate, closest = [], [], None
        dep5 = next((a for a in reversed(self.dep5) if a.matches(rel)), None)
        aggregate += [dep5.license] if dep5 else []
        for folder in sorted(self.tomls, key=lambda f: 0 if f == "." else f.count("/") + 1):  # the root's first
            if folder != "." and not rel.startswith(folder + "/"):
                continue
            below = rel if folder == "." else rel[len(folder) + 1 :]
            table = next((a for a in reversed(self.tomls[folder]) if a.matches(below)), None)  # the last one counts
            if table is None:
                continue
            if table.precedence == "override":  # the outermost override is authoritative: nothing closer counts
                override.append(table.license)
                break
            if table.precedence == "aggregate":
                aggregate.append(table.license)
            elif table.license:
                closest = table.license
        own = self.companions[rel] if rel in self.companions else tags
        return conjoin([*override, *aggregate] + ([] if override else [own or closest]))

    @cached_property
    def fallback(self) -> str | None:
        """The license of a file REUSE declares nothing for: every license the project ships a `LICENSES/` text of
        (any may be the file's) with what it states besides; without either, every license its REUSE.toml or dep5
        declares (the paths they name are not this file's, but nothing else is known)."""
        shipped = [spdx for ids in self.licenses for spdx in ids]
        found = conjoin([self.stated, *shipped]) if shipped or self.stated else conjoin(self._declarations())
        return normalize(found) if found else None

    @cached_property
    def whole(self) -> str | None:
        """The project's license as a whole: every license it states, ships or declares, with AND."""
        found = conjoin([self.stated, *(spdx for ids in self.licenses for spdx in ids), *self._declarations()])
        return normalize(found) if found else None

    def possible(self) -> list[str]:
        """Each license a file can get from `license_of`, one declaration at a time (a project none of whose licenses
        is allowed can be excluded whole)."""
        found = [ids[0] for ids in self.licenses if ids] + self._declarations() + [self.fallback]
        return [self._verified(e) for e in dict.fromkeys(e for e in found if e)]

    def _declarations(self) -> list[str]:
        tables = [a for annotations in self.tomls.values() for a in annotations] + self.dep5
        found = [a.license for a in tables] + list(self.companions.values())
        return list(dict.fromkeys(e for e in found if e))

    @cached_property
    def _extra(self) -> dict[str, list[str]]:
        return {ids[0]: ids[1:] for ids in self.licenses if len(ids) > 1}

    def _verified(self, expression: str | None) -> str | None:
        # `MIT` in a project whose LICENSES/MIT.txt is a GPL text → `MIT AND GPL-3.0-or-later`.
        extra = self._extra
        if not expression or not extra:
            return expression
        try:
            keys = _licensing().license_keys(expression)
        except Exception:
            return expression
        return conjoin([expression, *(spdx for key in keys for spdx in extra.get(key, []))])


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
def _licensing():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def is_spdx(expression: str) -> bool:
    """True when every symbol of the expression is a known SPDX license id."""
    try:
        return not _licensing().validate(expression).errors
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
            parsed = _licensing().parse(expression, validate=False)
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
    """Canonical SPDX spelling of an expression (e.g. 'mit or apache-2.0' → 'MIT OR Apache-2.0')."""
    try:
        return str(_licensing().parse(expression, validate=False))
    except Exception:
        return expression.strip()
