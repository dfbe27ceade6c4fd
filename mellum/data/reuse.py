"""REUSE (https://reuse.software, spec 3.3): the files of a project with a `LICENSES/` folder of texts named by
SPDX id, a REUSE.toml or a .reuse/dep5, licensed one by one by the spec's rules (`Reuse`): REUSE.toml tables by
precedence and globs, dep5 paragraphs, `.license` companions and SPDX tags, each `LICENSES/` text checked against
its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from mellum.data.license import TEXT_IDS, conjoin, detect_text, licensing, normalize

_TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".markdown", ".html", ".htm")
UNVERIFIED = "LicenseRef-Unverified-{}"  # a LICENSES/ file whose text is not the license its name says


def _family(spdx: str) -> str:
    # License texts do not say "only" or "or later" (the notice in each file does), so text detection cannot.
    return re.sub(r"(?:-only|-or-later|\+)$", "", spdx)


_DETECTABLE = frozenset(_family(spdx) for spdx in TEXT_IDS)  # licenses whose texts `detect_text` knows


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
    return spdx.lower() in licensing().known_symbols_lowercase or bool(_LICENSE_REF.fullmatch(spdx))


def reuse_ids(name: str, text: str) -> list[str]:
    """The licenses a file of a REUSE `LICENSES/` folder stands for: its SPDX id, by its name, checked against its
    text where `detect_text` recognises texts. A text that is another license adds that license; a text that is no
    license it knows, under the name of one it does, adds an unverified marker (unknown: excluded). An
    exception (`LLVM-exception.txt`) adds nothing: it only applies `WITH` a license. A name that is no SPDX id
    stands for an unknown license."""
    spdx = _reuse_name(name)
    symbol = licensing().known_symbols_lowercase.get(spdx.lower())
    if symbol is not None and symbol.is_exception:
        return []
    if symbol is None:
        return [spdx if _LICENSE_REF.fullmatch(spdx) else
                "LicenseRef-Unknown-" + (re.sub(r"[^A-Za-z0-9.-]+", "-", spdx).strip("-.") or "Name")]
    spdx = normalize(spdx)
    found = detect_text(text)
    if found is not None and _family(found) != _family(spdx):
        return [spdx, found]
    if found is None and _family(spdx) in _DETECTABLE:
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
    out: list[str] = []

    def add(token: str) -> None:
        # Wildcards in a row (`**/**/*.py`, `***`) are one: each more `.*` made a path that does not match cost
        # another factor of its length to reject (0.8 s for `**/**/**/**/**/*.py`, asked of every file).
        if out and token in _WILDCARDS and out[-1] in _WILDCARDS:
            out[-1] = ".*" if ".*" in (token, out[-1]) else "[^/]*"
        else:
            out.append(token)

    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            add(re.escape(pattern[i + 1]))
            i += 2
            continue
        if pattern[i] == "*" and not dep5:
            star = 3 if pattern.startswith("**/", i) else 2 if pattern.startswith("**", i) else 1
            add("[^/]*" if star == 1 else ".*")
            i += star
            continue
        add(".*" if pattern[i] == "*" else "." if pattern[i] == "?" and dep5 else re.escape(pattern[i]))
        i += 1
    return "".join(out)


_WILDCARDS = ("[^/]*", ".*")


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
    another license, or none `detect_text` knows (`reuse_ids`), brings that along."""

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
            keys = licensing().license_keys(expression)
        except Exception:
            return expression
        return conjoin([expression, *(spdx for key in keys for spdx in extra.get(key, []))])
