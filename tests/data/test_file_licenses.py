"""License evidence beside the project's LICENSE, end to end through `build_corpus`: REUSE projects (LICENSES/,
REUSE.toml, .reuse/dep5), license notices in a file's head, and NOTICE files that credit files to a license."""

from __future__ import annotations

from pathlib import Path

from mellum.data.corpus import BuildConfig, build_corpus, read_corpus
from mellum.data.license import PERMISSIVE

FIXTURES = Path(__file__).parent / "fixtures"
MIT = (FIXTURES / "mit_project" / "LICENSE").read_text()
APACHE = (FIXTURES / "apache_project" / "LICENSE").read_text()
GPL3 = (FIXTURES / "gpl_project" / "COPYING").read_text()
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
    assert (entry["kept"], entry["license"], entry["license_source"]) == (True, "Apache-2.0 AND MIT", "REUSE")
    assert kept == {"src/mit_file.py": "MIT", "src/apache_file.py": "Apache-2.0",
                    "src/untagged.py": "Apache-2.0 AND MIT"}
    assert report["skipped_by_reason"] == {
        "not a selected language": 2,  # the LICENSES/ texts
        "file license GPL-3.0-or-later": 1, "file license LicenseRef-Proprietary": 1,
        "file license MIT AND GPL-2.0-only": 1,
    }


def test_reuse_projects_are_excluded_for_any_license_they_declare_that_is_not_allowed(tmp_path):
    cases = {
        # A copyleft id among LICENSES/: any untagged file may be under it.
        "copyleft": {"LICENSES/MIT.txt": MIT, "LICENSES/GPL-3.0-or-later.txt": GPL3},
        # A text that is not the license its name says, or no license text this module knows.
        "mislabelled": {"LICENSES/MIT.txt": GPL3},
        "unverified": {"LICENSES/MIT.txt": "Copyright 2024 Corp. All rights reserved.\n"},
        # An id that is no SPDX license, and a custom LicenseRef.
        "unknown_name": {"LICENSES/MIT.txt": MIT, "LICENSES/README.md": "Licenses of this project.\n"},
        "licenseref": {"LICENSES/MIT.txt": MIT, "LICENSES/LicenseRef-Corp.txt": "Corp internal use only.\n"},
        # REUSE.toml and .reuse/dep5 declare licenses too, whether or not LICENSES/ has their text.
        "toml": {"LICENSES/MIT.txt": MIT, "REUSE.toml": 'version = 1\n\n[[annotations]]\npath = "gen/**"\n'
                 'SPDX-FileCopyrightText = "Corp"\nSPDX-License-Identifier = "AGPL-3.0-only"\n'},
        "dep5": {"LICENSES/MIT.txt": MIT, ".reuse/dep5": "Format: https://www.debian.org/doc/packaging-manuals/"
                 "copyright-format/1.0/\n\nFiles: gen/*\nCopyright: Corp\nLicense: LGPL-2.1-or-later\n"},
        # A LICENSE file beside LICENSES/: both apply (it was the only evidence read, and the project kept as MIT).
        "license_file_too": {"LICENSE": MIT, "LICENSES/MIT.txt": MIT, "LICENSES/GPL-3.0-or-later.txt": GPL3},
    }
    for name, files in cases.items():
        _write(tmp_path / "src" / name, {**files, "pkg/core.py": _code(f"core_{name}")})
    report, kept = _build(tmp_path, *sorted((tmp_path / "src").iterdir()))
    assert kept == {}
    assert report["excluded_by_reason"] == {
        "license not allowed: MIT AND AGPL-3.0-only": ["toml"],
        "license not allowed: GPL-3.0-or-later AND MIT": ["copyleft"],
        "license not allowed: LicenseRef-Corp AND MIT": ["licenseref"],
        "license not allowed: MIT AND LicenseRef-Unknown-README": ["unknown_name"],
        "license not allowed: MIT AND GPL-3.0-or-later": ["license_file_too", "mislabelled"],
        "license not allowed: MIT AND LGPL-2.1-or-later": ["dep5"],
        "license not allowed: MIT AND LicenseRef-Unverified-MIT": ["unverified"],
    }
    sources = {p["name"]: p["license_source"] for p in report["projects"]}
    assert sources["license_file_too"] == "license file + REUSE" and sources["toml"] == "REUSE"


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
    })
    report, kept = _build(tmp_path, site)
    projects = {p["name"]: p for p in report["projects"]}
    # A short License field may not cover every file: the GPL text in LICENSES/ let `mixed` in as MIT.
    assert projects["mixed"]["license_source"] == "License + REUSE" and not projects["mixed"]["kept"]
    assert (projects["ok"]["license"], projects["ok"]["license_source"]) == ("MIT", "REUSE")
    assert kept == {"ok/__init__.py": "MIT"}


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
