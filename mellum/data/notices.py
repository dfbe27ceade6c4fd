"""License notices in prose: a file's head that puts the file under a license ("This Source Code Form is subject
to the terms of the Mozilla Public License, v. 2.0", the GNU boilerplate, "Licensed under the Apache License"), and a
NOTICE file that credits files by name to a license.
"""

from __future__ import annotations

import re

from mellum.data.license import SHORT_NAMES, conjoin, detect_text, head, is_spdx, normalize

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
    ("BSD", r"(?:(?:new|modified|revised|simplified|freebsd|original|[234][\s-]*clause)\s+)?"
            r"bsd(?![\s-]*(?:style|like))"),  # "BSD-style" does not say which
)
_NAME = "|".join(f"(?P<n{i}>{pattern})" for i, (_, pattern) in enumerate(_NOTICE_NAMES))
_NOTICE = re.compile(rf"\b{_NOTICE_VERB}(?:{_NAME})(?![a-uw-z0-9])", re.IGNORECASE)
# Another license named later in the notice's sentence is a choice: after "or" ("Licensed under the Apache License,
# Version 2.0 or the MIT license"; the Linux kernel's OpenIB "... the GNU General Public License (GPL) Version 2, ...,
# or the OpenIB.org BSD license below"), and after "and" where the sentence offers one ("Dual licensed under the GPL
# and MIT licenses"). The first name alone kept such files out as GPL.
_ALTERNATIVE = re.compile(rf"\b(?P<conj>or|and)\s+(?:under\s+)?(?:the\s+)?(?:terms\s+of\s+(?:the\s+)?)?"
                          rf"(?:[\w-]+\.(?:org|com|net)\s+)?(?:{_NAME})(?![a-uw-z0-9])", re.IGNORECASE)
_CHOICE = re.compile(r"\b(?:dual(?:ly)?|choice|choose|either|alternatively)\b", re.IGNORECASE)
# "This file is NOT licensed under the GPLv3, which is the license for the rest of YouCompleteMe": no notice.
_NEGATED = re.compile(r"\b(?:not|never|no\s+longer)\s+(?:be(?:en)?\s+)?$", re.IGNORECASE)
# The version right after the name ("GPLv2", "MPL-2.0", "License, v. 2.0", "License, Version 2.0") or, for the GNU
# licenses, anywhere in the notice's sentence ("... as published by the FSF; either version 3 of the License").
_VERSION_AFTER = re.compile(r"[\s,]*(?:v(?:ersion)?\.?\s*|-)?(\d+(?:\.\d+)?)(\+)?", re.IGNORECASE)
_VERSION_IN = re.compile(r"\bversion\s+(\d+(?:\.\d+)?)\b", re.IGNORECASE)
_LATER = re.compile(r"any\s+later\s+version|or\s+later", re.IGNORECASE)
_DEFAULT_VERSION = {"AGPL": "3.0", "LGPL": "2.1", "LGPL-2.0": "2.0", "GPL": "3.0", "MPL": "2.0", "EPL": "2.0",
                    "CDDL": "1.0", "EUPL": "1.2", "Apache": "2.0"}


def _notice_id(m: re.Match, after: str) -> str:
    """The SPDX id of the license a notice (or an alternative in it) names, from the name and the text after it."""
    family = next(family for i, (family, _) in enumerate(_NOTICE_NAMES) if m.group(f"n{i}"))
    if family == "MIT":
        return "MIT"
    if family == "BSD":  # a bare "BSD license" is the 3-clause one, as in SHORT_NAMES
        qualified = m.group(0) + after[:12]
        if re.search(r"simplified|freebsd|2[\s-]*clause", qualified, re.IGNORECASE):
            return "BSD-2-Clause"
        return "BSD-4-Clause" if re.search(r"original|4[\s-]*clause", qualified, re.IGNORECASE) else "BSD-3-Clause"
    sentence = re.split(r"\.(?:\s|$)", after, maxsplit=1)[0]
    v = _VERSION_AFTER.match(after)
    gnu = family in ("AGPL", "LGPL", "LGPL-2.0", "GPL")
    if v is None and gnu:
        v = _VERSION_IN.search(sentence)
    version = v.group(1) if v else _DEFAULT_VERSION[family]
    version = version if "." in version else f"{version}.0"
    if not gnu:
        return f"{family}-{version}"
    later = v is None or bool(_LATER.search(sentence)) or bool(v.re is _VERSION_AFTER and v.group(2))
    return f"{family.split('-')[0]}-{version}-{'or-later' if later else 'only'}"


def _either(names: list[str]) -> str:
    unique = list(dict.fromkeys(names))
    return " OR ".join(f"({e})" if " " in e else e for e in unique) if len(unique) > 1 else unique[0]


def _notices(text: str) -> list[str]:
    """The license each notice in `text` (prose, whitespace made single spaces) names, a choice as an OR."""
    found: list[list[str]] = []  # the licenses each notice offers
    for m in _NOTICE.finditer(text):
        if re.search(r"\brest\s+of\b[^.]*$", text[max(0, m.start() - 80) : m.start()], re.IGNORECASE):
            continue  # about the other files: "The rest of Valgrind is licensed under the GPL" (valgrind.h is BSD)
        clause = re.split(r"\.(?:\s|$)", text[max(0, m.start() - 200) : m.start()])[-1]  # its sentence, to the verb
        if _NEGATED.search(clause):
            continue
        after = text[m.end() : m.end() + 300]
        sentence = re.split(r"\.(?:\s|$)", after, maxsplit=1)[0]
        choice = _CHOICE.search(clause + m.group(0)) is not None
        alternatives = [a for a in _ALTERNATIVE.finditer(sentence) if choice or a.group("conj").lower() == "or"]
        ends = [a.start() for a in alternatives]
        names = [_notice_id(m, after[: ends[0]] if ends else after[:200])]
        names += [_notice_id(a, sentence[a.end() : end]) for a, end in zip(alternatives, ends[1:] + [len(sentence)])]
        if re.search(r"\balternatively\b", clause, re.IGNORECASE):
            # A choice besides what comes before: a notice (wpa_supplicant's GPL-2.0, "Alternatively, this software
            # may be distributed under the terms of BSD license") or a license text (a BSD text, then "ALTERNATIVELY,
            # this software may be distributed under the terms of the GNU General Public License"). With neither
            # known, what it is an alternative to is unknown: the notice stands alone (Qt's commercial license).
            if found:
                found[-1] += names
                continue
            earlier = detect_text(text[: m.start()])
            names = [earlier, *names] if earlier else names
        found.append(names)
    return [_either(names) for names in found]


def notice_header(text: str) -> str | None:
    """The license a prose notice in a file's first HEAD_LINES lines puts the file under (MPL's Exhibit A, the GNU
    "either version 2 of the License, or (at your option) any later version", Apache's "Licensed under the Apache
    License, Version 2.0"), several combined with AND, a choice ("Dual licensed under the GPL and MIT licenses",
    "Alternatively, ...") with OR; None when the head has no notice."""
    top = head(text)
    lowered = top.lower()
    if "under" not in lowered and "subject" not in lowered:  # every notice's verb has one: most files stop here
        return None
    prose = re.sub(r"\s+", " ", re.sub(r"^[ \t]*(?:#+|//+|/?\*+/?|--+|;+|%+|!|rem\b)", " ", top, flags=re.M))
    return conjoin(list(dict.fromkeys(_notices(prose))))


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

