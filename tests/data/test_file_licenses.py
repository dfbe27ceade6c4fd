"""License evidence beside the project's LICENSE, end to end through `build_corpus`: REUSE projects (LICENSES/,
REUSE.toml, .reuse/dep5, `.license` companions: each file licensed by REUSE's rules), license notices in a file's
head, and NOTICE files that credit files to a license."""

from __future__ import annotations

from pathlib import Path

from mellum.data.corpus import BuildConfig, build_corpus, read_corpus
from mellum.data.license import PERMISSIVE

FIXTURES = Path(__file__).parent / "fixtures"
MIT = (FIXTURES / "mit_project" / "LICENSE").read_text()
APACHE = (FIXTURES / "apache_project" / "LICENSE").read_text()
GPL3 = (FIXTURES / "gpl_project" / "COPYING").read_text()
CC_BY = "Attribution 4.0 International\n\nCreative Commons Corporation (\"Creative Commons\") is not a law firm.\n"
CC0 = "Creative Commons Legal Code\n\nCC0 1.0 Universal\n\nCREATIVE COMMONS CORPORATION IS NOT A LAW FIRM.\n"
MPL_NOTICE = ("# This Source Code Form is subject to the terms of the Mozilla Public\n"
              "# License, v. 2.0. If a copy of the MPL was not distributed with this\n"
              "# file, You can obtain one at https://mozilla.org/MPL/2.0/.\n")


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _build(tmp_path: Path, *sources: Path, allow: frozenset[str] = PERMISSIVE) -> tuple[dict, dict[str, str]]:
    out = tmp_path / "corpus"
    report = build_corpus([str(s) for s in sources], out, BuildConfig(allow=allow, workers=1), progress=False)
    return report, {r["path"]: r["license"] for r in read_corpus(out)}


def _code(name: str, header: str = "") -> str:
    return f"{header}def {name}(value):\n    return value * {len(name)} + {sum(map(ord, name))}\n"


def _tagged(name: str, spdx: str) -> str:
    return _code(name, f"# SPDX-FileCopyrightText: 2024 Example\n#\n# SPDX-License-Identifier: {spdx}\n")


def _file_skips(entry: dict) -> dict[str, int]:
    return {reason: n for reason, n in entry["skipped"].items() if reason.startswith("file license")}


# ---- REUSE ------------------------------------------------------------------------------------------------------


def test_a_reuse_project_is_licensed_by_its_licenses_folder_and_its_files_by_their_tags(tmp_path):
    # No LICENSE file, only LICENSES/<SPDX id>.txt: such projects were excluded as "license unknown".
    project = _write(tmp_path / "reuse_proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/Apache-2.0.txt": APACHE,
        "src/mit_file.py": _code("mit_file", "# SPDX-FileCopyrightText: 2024 Someone\n"
                                             "# SPDX-License-Identifier: MIT\n"),
        "src/apache_file.py": _code("apache_file", "# SPDX-License-Identifier: Apache-2.0\n"),
        "src/untagged.py": _code("untagged"),
        "src/copyleft.py": _code("copyleft", "# SPDX-License-Identifier: GPL-3.0-or-later\n"),
        "src/unknown.py": _code("unknown", "# SPDX-License-Identifier: LicenseRef-Proprietary\n"),
        # Two tags: both apply. Reading only the first let this file in as MIT.
        "src/two_tags.py": _code("two_tags", "# SPDX-License-Identifier: MIT\n"
                                             "# SPDX-License-Identifier: GPL-2.0-only\n"),
    })
    report, kept = _build(tmp_path, project)
    entry = report["projects"][0]
    assert (entry["kept"], entry["license"], entry["license_source"]) == (True, "Apache-2.0 AND MIT", "REUSE, per file")
    assert kept == {"src/mit_file.py": "MIT", "src/apache_file.py": "Apache-2.0",
                    "src/untagged.py": "Apache-2.0 AND MIT"}
    assert report["skipped_by_reason"] == {
        "not a selected language": 2,  # the LICENSES/ texts
        "file license GPL-3.0-or-later": 1, "file license LicenseRef-Proprietary": 1,
        "file license MIT AND GPL-2.0-only": 1,
    }


def test_reuse_licenses_that_are_not_allowed_keep_out_the_files_they_may_cover(tmp_path):
    # Every case holds `pkg/core.py`, which REUSE declares nothing for, and `gen/gen.py`.
    cases = {
        # A copyleft id among LICENSES/: any undeclared file may be under it.
        "copyleft": {"LICENSES/MIT.txt": MIT, "LICENSES/GPL-3.0-or-later.txt": GPL3},
        # A text that is not the license its name says, or no license text this module knows: no file can be
        # allowed, so the project is excluded whole.
        "mislabelled": {"LICENSES/MIT.txt": GPL3},
        "unverified": {"LICENSES/MIT.txt": "Copyright 2024 Corp. All rights reserved.\n"},
        # An id that is no SPDX license, and a custom LicenseRef.
        "unknown_name": {"LICENSES/MIT.txt": MIT, "LICENSES/README.md": "Licenses of this project.\n"},
        "licenseref": {"LICENSES/MIT.txt": MIT, "LICENSES/LicenseRef-Corp.txt": "Corp internal use only.\n"},
        # REUSE.toml and .reuse/dep5 license the files they name, whether or not LICENSES/ has their text.
        "toml": {"LICENSES/MIT.txt": MIT, "REUSE.toml": 'version = 1\n\n[[annotations]]\npath = "gen/**"\n'
                 'SPDX-FileCopyrightText = "Corp"\nSPDX-License-Identifier = "AGPL-3.0-only"\n'},
        "dep5": {"LICENSES/MIT.txt": MIT, ".reuse/dep5": "Format: https://www.debian.org/doc/packaging-manuals/"
                 "copyright-format/1.0/\n\nFiles: gen/*\nCopyright: Corp\nLicense: LGPL-2.1-or-later\n"},
        # A LICENSE file beside LICENSES/: both apply to undeclared files.
        "license_file_too": {"LICENSE": MIT, "LICENSES/MIT.txt": MIT, "LICENSES/GPL-3.0-or-later.txt": GPL3},
        # Only copyleft texts: no file can be allowed, whatever its header says (REUSE wants its text in LICENSES/).
        "copyleft_only": {"LICENSES/GPL-3.0-or-later.txt": GPL3, "pkg/mit.py": _tagged("mit_only", "MIT")},
    }
    for name, files in cases.items():
        code = {"pkg/core.py": _code(f"core_{name}"), "gen/gen.py": _code(f"gen_{name}")}
        _write(tmp_path / "src" / name, {**files, **code})
    report, _ = _build(tmp_path, *sorted((tmp_path / "src").iterdir()))
    kept = {(r["project"], r["path"]): r["license"] for r in read_corpus(tmp_path / "corpus")}
    assert kept == {("toml", "pkg/core.py"): "MIT", ("dep5", "pkg/core.py"): "MIT"}
    assert report["excluded_by_reason"] == {
        "license not allowed: GPL-3.0-or-later": ["copyleft_only"],
        "license not allowed: MIT AND GPL-3.0-or-later": ["mislabelled"],
        "license not allowed: MIT AND LicenseRef-Unverified-MIT": ["unverified"],
    }
    projects = {p["name"]: p for p in report["projects"]}
    assert {name: _file_skips(p) for name, p in projects.items() if p["kept"]} == {
        "copyleft": {"file license GPL-3.0-or-later AND MIT": 2},
        "unknown_name": {"file license MIT AND LicenseRef-Unknown-README": 2},
        "licenseref": {"file license LicenseRef-Corp AND MIT": 2},
        "toml": {"file license AGPL-3.0-only": 1},
        "dep5": {"file license LGPL-2.1-or-later": 1},
        "license_file_too": {"file license MIT AND GPL-3.0-or-later": 2},
    }
    # The project's license is every license it has, for the record; its files are licensed one by one.
    assert (projects["toml"]["license"], projects["toml"]["license_source"]) == ("MIT AND AGPL-3.0-only",
                                                                                 "REUSE, per file")
    assert projects["license_file_too"]["license_source"] == "license file + REUSE, per file"


DOCS_TOML = """version = 1

[[annotations]]
path = "docs/**"
SPDX-FileCopyrightText = "2024 Example"
SPDX-License-Identifier = "CC-BY-4.0"

[[annotations]]
path = ["*.toml", "tools/**"]
SPDX-FileCopyrightText = "2024 Example"
SPDX-License-Identifier = "CC0-1.0"
"""


def test_an_mit_reuse_project_with_cc_by_docs_keeps_its_code(tmp_path):
    # REUSE's usual layout: code MIT, docs CC-BY-4.0, config CC0-1.0. The AND of every id excluded it whole.
    project = _write(tmp_path / "proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/CC-BY-4.0.txt": CC_BY, "LICENSES/CC0-1.0.txt": CC0, "REUSE.toml": DOCS_TOML,
        "src/app.py": _tagged("app", "MIT"),
        "src/dual.py": _tagged("dual", "MIT OR Apache-2.0"),
        "tools/release.py": _code("release"),  # annotated CC0-1.0
        "docs/conf.py": _code("conf"),  # annotated CC-BY-4.0: not allowed
        "docs/example.py": _tagged("example", "MIT"),  # "closest" (the default): its own tag decides
        "src/untagged.py": _code("untagged"),  # nothing declared: any license of LICENSES/ may be its
    })
    report, kept = _build(tmp_path, project)
    entry = report["projects"][0]
    assert (entry["kept"], entry["license_source"]) == (True, "REUSE, per file")
    assert entry["license"] == "CC-BY-4.0 AND CC0-1.0 AND MIT"
    assert report["kept_by_license"] == {"CC-BY-4.0 AND CC0-1.0 AND MIT": 1}
    assert kept == {"src/app.py": "MIT", "src/dual.py": "MIT OR Apache-2.0", "tools/release.py": "CC0-1.0",
                    "docs/example.py": "MIT"}
    assert _file_skips(entry) == {"file license CC-BY-4.0": 1, "file license CC-BY-4.0 AND CC0-1.0 AND MIT": 1}


PRECEDENCE_TOML = """version = 1

[[annotations]]
path = "src/**"
SPDX-License-Identifier = "MIT"

[[annotations]]
path = "src/legacy/**"
precedence = "aggregate"
SPDX-License-Identifier = "GPL-2.0-only"

[[annotations]]
path = "upstream/**"
precedence = "override"
SPDX-License-Identifier = "Apache-2.0"

[[annotations]]
path = "gen/**"
precedence = "override"
SPDX-License-Identifier = "LGPL-3.0-only"

[[annotations]]
path = "sub/**"
SPDX-License-Identifier = "GPL-3.0-only"

[[annotations]]
path = "sub/locked/**"
precedence = "override"
SPDX-License-Identifier = "BSD-3-Clause"
"""

NESTED_TOML = """version = 1

[[annotations]]
path = "**"
SPDX-License-Identifier = "BSD-2-Clause"

[[annotations]]
path = "locked/**"
precedence = "override"
SPDX-License-Identifier = "AGPL-3.0-only"
"""


def test_reuse_toml_precedence_closest_aggregate_override_and_nesting(tmp_path):
    project = _write(tmp_path / "proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/Apache-2.0.txt": APACHE, "REUSE.toml": PRECEDENCE_TOML,
        "sub/REUSE.toml": NESTED_TOML,
        "src/plain.py": _code("plain"),  # closest table: MIT
        "src/own.py": _tagged("own", "Apache-2.0"),  # closest: the file's own tag wins over the table
        # The last matching table counts (src/legacy/** after src/**), and "aggregate" adds to the file's own tag.
        "src/legacy/old.py": _tagged("old", "MIT"),
        "upstream/lib.py": _tagged("lib", "MIT"),  # override: the table alone, the file's tag is not read
        "upstream/gpl.py": _tagged("gpl", "GPL-3.0-only"),  # ... but a tag that is not allowed still keeps it out
        "gen/parser.py": _tagged("parser", "MIT"),  # override to a license that is not allowed
        "sub/x.py": _code("x"),  # sub/REUSE.toml is closer than the root's closest table
        "sub/locked/y.py": _code("y"),  # the root's override is authoritative over sub/REUSE.toml's
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"src/plain.py": "MIT", "src/own.py": "Apache-2.0", "upstream/lib.py": "Apache-2.0",
                    "sub/x.py": "BSD-2-Clause", "sub/locked/y.py": "BSD-3-Clause"}
    assert _file_skips(report["projects"][0]) == {
        "file license GPL-2.0-only AND MIT": 1, "file license Apache-2.0 AND GPL-3.0-only": 1,
        "file license LGPL-3.0-only": 1,
    }


DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: proj

Files: *
Copyright: 2024 Example
License: MIT

Files: docs/*
Copyright: 2024 Example
License: CC-BY-4.0

Files: src/old?/*
 src/legacy/*.py
Copyright: 2010 Someone
License: GPL-2.0-or-later
 This program is free software; you can redistribute it and/or modify it under the terms of the GNU General Public
 License as published by the Free Software Foundation; either version 2 of the License, or (at your option) any
 later version.

License: CC-BY-4.0
 Attribution 4.0 International
"""


def test_reuse_dep5_paragraphs_license_files_with_their_own_tags(tmp_path):
    project = _write(tmp_path / "proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/CC-BY-4.0.txt": CC_BY, ".reuse/dep5": DEP5,
        "src/app.py": _code("app"),  # `Files: *`: `*` matches `/` in dep5
        "src/apache.py": _tagged("apache", "Apache-2.0"),  # dep5 is aggregated with the file's own tag
        "docs/conf.py": _code("conf"),  # the last matching paragraph counts
        "src/legacy/deep/old.py": _code("old"),  # a pattern continued on the next line
        "src/old1/x.py": _code("x"),  # `?` is one character
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"src/app.py": "MIT", "src/apache.py": "MIT AND Apache-2.0"}
    assert report["projects"][0]["license_source"] == "REUSE, per file"
    assert _file_skips(report["projects"][0]) == {"file license CC-BY-4.0": 1, "file license GPL-2.0-or-later": 2}


def test_a_license_companion_stands_in_for_the_files_head(tmp_path):
    companion = "SPDX-FileCopyrightText: 2024 Example\n\nSPDX-License-Identifier: {}\n"
    project = _write(tmp_path / "proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/CC-BY-4.0.txt": CC_BY,
        "src/table.py": _code("table"), "src/table.py.license": companion.format("MIT"),
        "src/relicensed.py": _tagged("relicensed", "Apache-2.0"), "src/relicensed.py.license": companion.format("MIT"),
        "src/snippet.py": _code("snippet"), "src/snippet.py.license": companion.format("CC-BY-4.0"),
        # A tag in the file that is not allowed keeps it out, though REUSE reads the companion only.
        "src/stale.py": _tagged("stale", "GPL-3.0-only"), "src/stale.py.license": companion.format("MIT"),
        "src/untagged.py": _code("untagged"),
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"src/table.py": "MIT", "src/relicensed.py": "MIT"}
    assert _file_skips(report["projects"][0]) == {
        "file license CC-BY-4.0": 1, "file license MIT AND GPL-3.0-only": 1, "file license CC-BY-4.0 AND MIT": 1,
    }


def test_reuse_evidence_that_does_not_hold_keeps_out_what_it_may_cover(tmp_path):
    project = _write(tmp_path / "proj", {
        "LICENSES/MIT.txt": MIT, "LICENSES/Apache-2.0.txt": "Copyright Corp. All rights reserved.\n",
        "LICENSES/CC-BY-4.0.txt": CC_BY, "REUSE.toml": DOCS_TOML,
        "src/mit.py": _tagged("mit", "MIT"),
        # LICENSES/Apache-2.0.txt is no Apache license: a file under that id may be under whatever it is.
        "src/apache.py": _tagged("apache", "Apache-2.0"),
        "src/either.py": _tagged("either", "MIT OR Apache-2.0"),
        "src/untagged.py": _code("untagged"),
        # A REUSE.toml that cannot be read may say anything of the files below it.
        "broken/REUSE.toml": 'version = 1\n[[annotations]]\npath = "**"\nprecedence = "overide"\n',
        "broken/tagged.py": _tagged("broken_tagged", "MIT"),
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"src/mit.py": "MIT"}
    unverified = "LicenseRef-Unverified-Apache-2.0"
    assert _file_skips(report["projects"][0]) == {
        f"file license Apache-2.0 AND {unverified}": 1, f"file license (MIT OR Apache-2.0) AND {unverified}": 1,
        f"file license Apache-2.0 AND {unverified} AND CC-BY-4.0 AND MIT": 1,
        "file license LicenseRef-Unreadable-REUSE.toml AND MIT": 1,
    }


def test_reuse_exceptions_and_permissive_declarations_keep_the_project(tmp_path):
    project = _write(tmp_path / "proj", {
        "LICENSES/Apache-2.0.txt": APACHE, "LICENSES/LLVM-exception.txt": "LLVM Exceptions to the Apache 2.0 License\n",
        "REUSE.toml": 'version = 1\n\n[[annotations]]\npath = "**"\nSPDX-License-Identifier = '
                      '"Apache-2.0 WITH LLVM-exception"\n',
        "lib.py": _code("lib"),
    })
    report, kept = _build(tmp_path, project)
    assert report["projects"][0]["license"] == "Apache-2.0 AND Apache-2.0 WITH LLVM-exception"
    assert list(kept) == ["lib.py"]


def test_a_licenses_folder_of_bundled_licenses_is_not_reuse(tmp_path):
    # pandas keeps its vendored code's licenses in LICENSES/ under names that are no SPDX ids: not REUSE's.
    project = _write(tmp_path / "proj", {
        "LICENSE": MIT, "LICENSES/NUMPY_LICENSE": "Copyright (c) NumPy Developers.\n",
        "LICENSES/OTHER": "Some parts are from elsewhere.\n", "core.py": _code("core"),
    })
    report, kept = _build(tmp_path, project)
    assert (report["projects"][0]["license"], report["projects"][0]["license_source"]) == ("MIT", "license file")
    assert kept == {"core.py": "MIT"}


def test_a_folder_with_reuse_files_of_its_own_takes_their_licenses(tmp_path):
    project = _write(tmp_path / "proj", {
        "LICENSE": MIT, "app.py": _code("app"),
        "libs/copied/LICENSES/GPL-3.0-only.txt": GPL3, "libs/copied/gpl_code.py": _code("gpl_code"),
        "libs/permissive/LICENSES/Apache-2.0.txt": APACHE, "libs/permissive/apache_code.py": _code("apache_code"),
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"app.py": "MIT", "libs/permissive/apache_code.py": "Apache-2.0"}
    assert report["skipped_by_reason"]["file license GPL-3.0-only"] == 1


def test_a_distribution_licensed_only_by_reuse_license_files(tmp_path):
    # PEP 639 keeps the LICENSES/ folder under .dist-info/licenses/; with no license metadata it is the evidence.
    site = _write(tmp_path / "site", {
        "ok-1.0.dist-info/METADATA": "Metadata-Version: 2.4\nName: ok\n",
        "ok-1.0.dist-info/licenses/LICENSES/MIT.txt": MIT,
        "ok-1.0.dist-info/RECORD": "ok/__init__.py,,\nok-1.0.dist-info/licenses/LICENSES/MIT.txt,,\n",
        "ok/__init__.py": _code("ok_init"),
        "mixed-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mixed\nLicense: MIT\n",
        "mixed-1.0.dist-info/licenses/LICENSES/MIT.txt": MIT,
        "mixed-1.0.dist-info/licenses/LICENSES/GPL-3.0-or-later.txt": GPL3,
        "mixed-1.0.dist-info/RECORD": "mixed/__init__.py,,\nmixed-1.0.dist-info/licenses/LICENSES/MIT.txt,,\n"
                                      "mixed-1.0.dist-info/licenses/LICENSES/GPL-3.0-or-later.txt,,\n",
        "mixed/__init__.py": _code("mixed_init"),
        # A wheel keeps its files' REUSE headers: they license the files one by one, as in the repository.
        "mixed/tagged.py": _tagged("mixed_tagged", "MIT"),
    })
    (site / "mixed-1.0.dist-info/RECORD").write_text((site / "mixed-1.0.dist-info/RECORD").read_text()
                                                     + "mixed/tagged.py,,\n")
    report, kept = _build(tmp_path, site)
    projects = {p["name"]: p for p in report["projects"]}
    # A short License field may not cover every file: the GPL text in LICENSES/ let `mixed/__init__.py` in as MIT.
    assert projects["mixed"]["license_source"] == "License + REUSE, per file"
    assert _file_skips(projects["mixed"]) == {"file license MIT AND GPL-3.0-or-later": 1}
    assert (projects["ok"]["license"], projects["ok"]["license_source"]) == ("MIT", "REUSE, per file")
    assert kept == {"ok/__init__.py": "MIT", "mixed/tagged.py": "MIT"}


# ---- license notices in a file's head -------------------------------------------------------------------------------


def test_a_license_notice_in_a_files_head_decides_its_license(tmp_path):
    # Hypothesis-style MPL-2.0 files vendored into an MIT project (not under a vendor/ folder) were kept as MIT.
    project = _write(tmp_path / "proj", {
        "LICENSE": MIT, "app.py": _code("app"),
        "pkg/mpl_part.py": "# This file is part of Hypothesis.\n#\n" + MPL_NOTICE + "\n" + _code("mpl_part"),
        "pkg/gpl_part.c": "/*\n * This program is free software; you can redistribute it and/or modify\n"
                          " * it under the terms of the GNU General Public License as published by\n"
                          " * the Free Software Foundation; either version 2 of the License, or\n"
                          " * (at your option) any later version.\n */\nint gpl_part(int x) { return x * 3; }\n",
        "pkg/lgpl_part.py": "# Licensed under the GNU Lesser General Public License v3\n" + _code("lgpl_part"),
        "pkg/apache_part.py": '# Licensed under the Apache License, Version 2.0 (the "License");\n'
                              + _code("apache_part"),
        # An explicit tag decides over the prose of the notice (a dual-licensed file's notice names one of its options).
        "pkg/tagged.py": "# SPDX-License-Identifier: MIT OR GPL-2.0-or-later\n# Licensed under the GNU General "
                         "Public License v2 or later.\n" + _code("tagged"),
        # Only the head counts: a notice quoted in the body, or a bare license name, is not the file's.
        "pkg/late.py": _code("late") + "\n" * 40 + MPL_NOTICE,
        "pkg/rules.py": 'RULES = ["gnu general public license", "version 3", "mozilla public license"]\n',
        # A permissive notice does not let in a file that its folder's license keeps out.
        "libs/gplthing/COPYING": GPL3,
        "libs/gplthing/ported.py": "# Ported from foo, licensed under the Apache License 2.0.\n" + _code("ported"),
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"app.py": "MIT", "pkg/apache_part.py": "Apache-2.0", "pkg/tagged.py": "MIT OR GPL-2.0-or-later",
                    "pkg/late.py": "MIT", "pkg/rules.py": "MIT"}
    assert {k: v for k, v in report["skipped_by_reason"].items() if k.startswith("file license")} == {
        "file license MPL-2.0": 1, "file license GPL-2.0-or-later": 1, "file license LGPL-3.0-only": 1,
        "file license GPL-3.0-or-later": 1,
    }
    # With MPL-2.0 allowed, the file is kept under its own license, not the project's.
    _, kept = _build(tmp_path / "mpl_allowed", project, allow=PERMISSIVE | {"MPL-2.0"})
    assert kept["pkg/mpl_part.py"] == "MPL-2.0"


def test_a_notice_offering_a_choice_keeps_the_file(tmp_path):
    # Dual-licensed files copied into an MIT project were skipped as "file license GPL-2.0-only": the notice's first
    # license was taken alone, and "NOT licensed under the GPL" was read as the GPL.
    project = _write(tmp_path / "proj", {
        "LICENSE": MIT, "app.py": _code("app"),
        "drivers/openib.c": "/*\n * This software is available to you under a choice of one of two licenses.\n"
                            " * You may choose to be licensed under the terms of the GNU General Public License\n"
                            " * (GPL) Version 2, available from the file COPYING in the main directory of this source\n"
                            " * tree, or the OpenIB.org BSD license below.\n */\nint openib(int x) { return x * 5; }\n",
        "web/plugin.js": "/* Dual licensed under the GPL (GPL-LICENSE.txt) and MIT (MIT-LICENSE.txt) licenses. */\n"
                         "function plugin(x) { return x * 7; }\n",
        "tools/not_gpl.py": "# This file is NOT licensed under the GPLv3, which is the license for the rest of its\n"
                            "# project.\n" + _code("not_gpl"),
        "tools/commercial.js": "/* Dual licensed under the GPL Version 2 and a Commercial license. */\n"
                               "function commercial(x) { return x * 11; }\n",
    })
    report, kept = _build(tmp_path, project)
    assert kept == {"app.py": "MIT", "drivers/openib.c": "GPL-2.0-only OR BSD-3-Clause",
                    "web/plugin.js": "GPL-3.0-or-later OR MIT", "tools/not_gpl.py": "MIT"}
    assert _file_skips(report["projects"][0]) == {"file license GPL-2.0-only": 1}


# ---- NOTICE files crediting files -----------------------------------------------------------------------------------

SETUPTOOLS_NOTICE = """The code contained in this directory was automatically generated using the
following command:

    python -m validate_pyproject.pre_compile --output-dir=setuptools/config/_validate_pyproject

Please avoid changing it manually.

***

The following files include code from opensource projects
(either as direct copies or modified versions):

- `fastjsonschema_exceptions.py`:
    - project: `fastjsonschema` - licensed under BSD-3-Clause
      (https://github.com/horejsek/python-fastjsonschema)
- `extra_validations.py` and `format.py`, `error_reporting.py`:
    - project: `validate-pyproject` - licensed under MPL-2.0
      (https://github.com/abravalheri/validate-pyproject)


Additionally the following files are automatically generated by tools provided
by the same projects:

- `__init__.py`
- `fastjsonschema_validations.py`
"""


def test_setuptools_notice_credits_files_to_mpl(tmp_path):
    # setuptools (MIT) ships validate-pyproject's MPL-2.0 modules with no notice in them: its NOTICE names them.
    # It names `format.py` for `formats.py`, so the credit covers the folder's files no credit names.
    folder = "setuptools/config/_validate_pyproject"
    names = ["__init__.py", "error_reporting.py", "extra_validations.py", "fastjsonschema_exceptions.py", "formats.py"]
    site = _write(tmp_path / "site", {
        "setuptools-80.0.dist-info/METADATA": "Metadata-Version: 2.4\nName: setuptools\nLicense-Expression: MIT\n",
        "setuptools-80.0.dist-info/RECORD": "".join(f"{folder}/{n},,\n" for n in names + ["NOTICE"])
        + "".join(f"setuptools/config/{n},,\n" for n in ("NOTICE", "setupcfg.py", "setuptools.schema.json",
                                                          "distutils.schema.json")),
        **{f"{folder}/{n}": _code(n.removesuffix(".py")) for n in names},
        f"{folder}/NOTICE": SETUPTOOLS_NOTICE,
        "setuptools/config/NOTICE": "- `setuptools.schema.json`, `distutils.schema.json`:\n    - project: "
                                    "`validate-pyproject` - licensed under MPL-2.0\n",
        "setuptools/config/setupcfg.py": _code("setupcfg"),
        "setuptools/config/setuptools.schema.json": '{"type": "object"}\n',
        "setuptools/config/distutils.schema.json": '{"type": "object"}\n',
    })
    report, kept = _build(tmp_path, site)
    assert kept == {f"{folder}/fastjsonschema_exceptions.py": "BSD-3-Clause", "setuptools/config/setupcfg.py": "MIT"}
    assert report["skipped_by_reason"]["file license MPL-2.0"] == 4
    assert report["projects"][0]["kept"] and report["projects"][0]["license"] == "MIT"
