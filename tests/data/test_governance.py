"""License detection and policy, quality filters, secret patterns and MinHash dedup, case by case."""

from __future__ import annotations

import email.parser
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mellum.data.dedup import DedupConfig, Deduplicator, MinHasher, exact_key, jaccard
from mellum.data.filters import FilterConfig, content_reason, language_of, path_reason
from mellum.data.license import LicensePolicy, detect_text, from_metadata, normalize, spdx_header
from mellum.data.notices import notice_credits, notice_header
from mellum.data.reuse import reuse_dep5, reuse_ids, reuse_toml
from mellum.data.secrets import SecretRedactor

FIXTURES = Path(__file__).parent / "fixtures"

BSD3 = """Redistribution and use in source and binary forms, with or without modification, are permitted provided
that the following conditions are met: ... Neither the name of the copyright holder nor the names of its
contributors may be used to endorse or promote products derived from this software."""
BSD2 = "Redistribution and use in source and binary forms, with or without modification, are permitted provided..."
ISC = """Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is
hereby granted, provided that the above copyright notice and this permission notice appear in all copies."""
ZERO_BSD = """Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is
hereby granted. THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES."""


@pytest.mark.parametrize(
    "text, spdx",
    [
        ((FIXTURES / "mit_project" / "LICENSE").read_text(), "MIT"),
        ((FIXTURES / "apache_project" / "LICENSE").read_text(), "Apache-2.0"),
        ((FIXTURES / "gpl_project" / "COPYING").read_text(), "GPL-3.0-or-later"),
        (BSD3, "BSD-3-Clause"),
        (BSD2, "BSD-2-Clause"),
        (ISC, "ISC"),
        (ZERO_BSD, "0BSD"),
        ("This is free and unencumbered software released into the public domain.", "Unlicense"),
        ("GNU LESSER GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007 ... the GNU General Public License", "LGPL-3.0-or-later"),
        ("GNU AFFERO GENERAL PUBLIC LICENSE Version 3", "AGPL-3.0-or-later"),
        ("Mozilla Public License Version 2.0", "MPL-2.0"),
        ("Altered source versions must be plainly marked as such, and must not be misrepresented. "
         "This notice may not be removed or altered from any source distribution.", "Zlib"),
        # A permissive license that appends a bundled GPL component's text is judged by its own (first) text.
        (BSD3 + "\n\nBundled: GNU GENERAL PUBLIC LICENSE Version 3", "BSD-3-Clause"),
        ("All rights reserved.", None),
        ("University of Illinois/NCSA Open Source License\n\nPermission is hereby granted, free of charge, to any "
         "person obtaining a copy of this software ... Neither the names of ... may be used to endorse", "NCSA"),
    ],
)
def test_license_text_detection(text, spdx):
    assert detect_text(text) == spdx


def test_real_stdlib_license_is_psf():
    license_txt = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not license_txt.is_file():
        pytest.skip("this Python ships no LICENSE.txt")
    assert detect_text(license_txt.read_text()) == "PSF-2.0"


def _meta(headers: str):
    return email.parser.Parser().parsestr(headers, headersonly=True)


def test_license_from_metadata():
    assert from_metadata(_meta("License-Expression: MIT OR Apache-2.0\nLicense: BSD\n")) == ("MIT OR Apache-2.0", "License-Expression")
    assert from_metadata(_meta("License: Apache 2.0\n")) == ("Apache-2.0", "License")
    assert from_metadata(_meta(
        "License: UNKNOWN\nClassifier: License :: OSI Approved :: BSD License\n"
        "Classifier: License :: OSI Approved :: GNU General Public License v2 (GPLv2)\n"
    )) == ("BSD-3-Clause AND GPL-2.0-only", "classifiers")
    assert from_metadata(_meta("Name: x\n")) == (None, "none")


def test_policy_evaluates_expressions():
    policy = LicensePolicy()
    assert policy.allows("MIT") and policy.allows("MIT OR GPL-3.0-only") and policy.allows("Apache-2.0 AND BSD-3-Clause")
    assert policy.allows("Apache-2.0 WITH LLVM-exception")
    assert not policy.allows("MIT AND GPL-3.0-only") and not policy.allows("MPL-2.0") and not policy.allows(None)
    assert not policy.allows("LicenseRef-Proprietary")
    assert LicensePolicy(frozenset({"MPL-2.0"})).allows("MPL-2.0") and not LicensePolicy(frozenset({"MPL-2.0"})).allows("MIT")
    assert normalize("mit or apache-2.0") == "MIT OR Apache-2.0"


def test_spdx_header():
    assert spdx_header("#!/usr/bin/env python\n# SPDX-License-Identifier: Apache-2.0 OR MIT\nx = 1\n") == "Apache-2.0 OR MIT"
    assert spdx_header("/* SPDX-License-Identifier: GPL-2.0-only */\nint x;\n") == "GPL-2.0-only"
    assert spdx_header("x = 1\n" * 40 + "# SPDX-License-Identifier: MIT\n") is None  # only the head counts


def test_spdx_header_in_a_docstring_string_or_html_comment():
    # Ending the expression only at a line end or a comment closer missed these: the file got the project license.
    assert spdx_header('"""SPDX-License-Identifier: GPL-3.0-only"""\ndef f():\n    pass\n') == "GPL-3.0-only"
    assert spdx_header("LICENSE = 'SPDX-License-Identifier: AGPL-3.0-or-later'\n") == "AGPL-3.0-or-later"
    assert spdx_header("<!-- SPDX-License-Identifier: MIT OR GPL-2.0-only -->\n") == "MIT OR GPL-2.0-only"
    assert spdx_header("# SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note\r\nx = 1\r\n") == (
        "GPL-2.0-only WITH Linux-syscall-note")
    assert spdx_header("# SPDX-License-Identifier:\nimport os\n") is None  # the next line is not the expression


def test_several_spdx_tags_all_apply():
    # REUSE writes one tag per license; the first alone let `MIT` hide the GPL.
    assert spdx_header("# SPDX-License-Identifier: MIT\n# SPDX-License-Identifier: GPL-3.0-only\n") == (
        "MIT AND GPL-3.0-only")
    assert spdx_header("// SPDX-License-Identifier: MIT OR Apache-2.0\n// SPDX-License-Identifier: 0BSD\n") == (
        "(MIT OR Apache-2.0) AND 0BSD")
    assert spdx_header("# SPDX-License-Identifier: MIT\nx = 1\n# SPDX-License-Identifier: MIT\n") == "MIT"


MPL_EXHIBIT_A = """# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at http://mozilla.org/MPL/2.0/.
"""
GNU_NOTICE = """ * This program is free software; you can redistribute it and/or modify it under the terms of the
 * GNU {name} as published by the Free Software Foundation; {version}
 *
 * This program is distributed in the hope that it will be useful, but WITHOUT ANY WARRANTY; see the GNU {name}.
"""


@pytest.mark.parametrize(
    "head, spdx",
    [
        (MPL_EXHIBIT_A, "MPL-2.0"),
        ("# This file is part of Hypothesis.\n#\n# Copyright the Hypothesis Authors.\n#\n" + MPL_EXHIBIT_A, "MPL-2.0"),
        ('/* The contents of this file are subject to the Mozilla Public License Version 1.1 (the "License"); */\n',
         "MPL-1.1"),
        ("/*\n" + GNU_NOTICE.format(name="General Public License",
                                    version="either version 2 of the License, or (at your option) any later version.")
         + " */\n", "GPL-2.0-or-later"),
        ("/*\n" + GNU_NOTICE.format(name="General Public License", version="version 2 of the License.") + " */\n",
         "GPL-2.0-only"),
        ("#\n" + GNU_NOTICE.format(name="Lesser General Public License",
                                   version="either version 3 of the License, or (at your option) any later version."),
         "LGPL-3.0-or-later"),
        ("# Licensed under the GNU General Public License, version 3\n", "GPL-3.0-only"),
        ("# Licensed under the GNU General Public License\n", "GPL-3.0-or-later"),
        ("# Released under GPLv2+\n", "GPL-2.0-or-later"),
        ("# Licensed under the GNU Affero General Public License v3\n", "AGPL-3.0-only"),
        (" * made available under the terms of the Eclipse Public License 2.0 which is available at\n", "EPL-2.0"),
        ('# Licensed under the Apache License, Version 2.0 (the "License");\n', "Apache-2.0"),
        ("# Licensed under the MIT License.\n", "MIT"),
        ('# Licensed under the BSD-3-clause license (the "License");\n', "BSD-3-Clause"),
        ("# Licensed under the simplified BSD license.\n", "BSD-2-Clause"),
        ("# Released under the BSD-style license found in the LICENSE file.\n", None),  # which BSD is not said
        # Not notices: bare names in code and prose, and a notice past the head.
        ('RULES = ["gnu general public license", "version 3", "mozilla public license"]\n', None),
        ('"""Detect GPL and MPL texts; see the GNU General Public License for what it requires."""\n', None),
        ("x = 1\n" * 40 + MPL_EXHIBIT_A, None),
        # valgrind.h: a BSD-style license for this file, the GPL for the others.
        ("/* Notice that the following BSD-style license applies to this one file (valgrind.h) only. The rest of\n"
         "   Valgrind is licensed under the terms of the GNU General Public License, version 2. */\n", None),
    ],
)
def test_license_notices_in_a_files_head(head, spdx):
    assert notice_header(head + "def f():\n    return 1\n") == spdx


@pytest.mark.parametrize(
    "head, spdx",
    [
        # A second license in the notice's sentence is a choice: the first name alone kept these files out as GPL.
        ("/*\n * This software is available to you under a choice of one of two licenses. You may choose to be\n"
         " * licensed under the terms of the GNU General Public License (GPL) Version 2, available from the file\n"
         " * COPYING in the main directory of this source tree, or the OpenIB.org BSD license below:\n *\n"
         " *   Redistribution and use in source and binary forms, with or without modification, ...\n */\n",
         "GPL-2.0-only OR BSD-3-Clause"),
        ("/* Dual licensed under the GPL (http://www.gnu.org/licenses/gpl.html)\n"
         " * and MIT (http://www.opensource.org/licenses/mit-license.php) licenses. */\n", "GPL-3.0-or-later OR MIT"),
        ("// Dual licensed under the GPL v 3 and the Apache 2.0 License\n", "GPL-3.0-only OR Apache-2.0"),
        ("# Licensed under the Apache License, Version 2.0 <LICENSE-APACHE> or the MIT license <LICENSE-MIT>, at\n"
         "# your option.\n", "Apache-2.0 OR MIT"),
        # "Alternatively": a choice besides the notice, or the license text, before it.
        ("/*\n * This program is free software; you can redistribute it and/or modify it under the terms of the GNU\n"
         " * General Public License version 2 as published by the Free Software Foundation.\n *\n"
         " * Alternatively, this software may be distributed under the terms of BSD license.\n */\n",
         "GPL-2.0-only OR BSD-3-Clause"),
        ("/*\n * " + BSD3 + "\n *\n * ALTERNATIVELY, this software may be distributed under the terms of the GNU\n"
         ' * General Public License ("GPL") version 2 as published by the Free Software Foundation.\n */\n',
         "BSD-3-Clause OR GPL-2.0-only"),
        # A choice of nothing this module knows, or besides something unknown, changes nothing.
        ("/* Dual licensed under the GPL Version 2 and a Commercial license. */\n", "GPL-2.0-only"),
        ("// Licensees holding valid commercial licenses may use this file under their agreement.\n"
         "// Alternatively, this file may be used under the terms of the GNU Lesser General Public License\n"
         "// version 3.\n",
         "LGPL-3.0-only"),
        # Negated: no notice at all.
        ("# This file is NOT licensed under the GPLv3, which is the license for the rest\n# of the project.\n#\n"
         "# This is free and unencumbered software released into the public domain.\n", None),
        ("# In order to allow designers to control their designs, this file is not licensed under the GPL but\n"
         "# may be used in any manner.\n", None),
    ],
)
def test_license_notices_offering_a_choice(head, spdx):
    assert notice_header(head + "def f():\n    return 1\n") == spdx


def test_notice_credits_name_files_and_their_licenses():
    notice = """The following files include code from opensource projects:

- `fastjsonschema_exceptions.py`:
    - project: `fastjsonschema` - licensed under BSD-3-Clause
      (https://github.com/horejsek/python-fastjsonschema)
- `extra_validations.py` and `format.py`, `error_reporting.py`:
    - project: `validate-pyproject` - licensed under MPL-2.0

Additionally the following files are automatically generated by tools provided by the same projects:

- `__init__.py`
- `fastjsonschema_validations.py`
"""
    assert notice_credits(notice) == {"fastjsonschema_exceptions.py": "BSD-3-Clause", "extra_validations.py": "MPL-2.0",
                                      "format.py": "MPL-2.0", "error_reporting.py": "MPL-2.0"}
    credit = "`schema.json` is from validate-pyproject, licensed under the Mozilla Public License 2.0\n"
    assert notice_credits(credit) == {"schema.json": "MPL-2.0"}
    assert notice_credits("- `x.py`: licensed under the Corp Evaluation License\n") == {
        "x.py": "LicenseRef-Unknown-Notice"}
    assert notice_credits("This product includes software developed at Corp (`corp.py`).\n") == {}


def test_reuse_license_files_are_checked_against_their_names():
    mit = (FIXTURES / "mit_project" / "LICENSE").read_text()
    gpl = (FIXTURES / "gpl_project" / "COPYING").read_text()
    assert reuse_ids("MIT.txt", mit) == ["MIT"]
    assert reuse_ids("GPL-3.0-only.txt", gpl) == ["GPL-3.0-only"]  # texts do not say "only" or "or later"
    assert reuse_ids("MIT.txt", gpl) == ["MIT", "GPL-3.0-or-later"]
    assert reuse_ids("MIT.txt", "All rights reserved.") == ["MIT", "LicenseRef-Unverified-MIT"]
    assert reuse_ids("X11.txt", mit) == ["X11", "MIT"]  # no rule for X11's text: the name stands, with what it is
    assert reuse_ids("CC-BY-4.0.txt", "Attribution 4.0 International") == ["CC-BY-4.0"]
    assert reuse_ids("LLVM-exception.txt", "LLVM Exceptions") == []
    assert reuse_ids("LicenseRef-Corp.txt", "Internal") == ["LicenseRef-Corp"]
    assert reuse_ids("notes.md", "Licenses of this project") == ["LicenseRef-Unknown-notes"]


def test_reuse_globs_match_as_the_spec_says():
    # REUSE.toml (spec 3.3): `*` stops at `/`, `**` and `**/` do not, `\*` is a star. dep5: `*` crosses `/`, `?`.
    (table,) = reuse_toml("version = 1\n[[annotations]]\npath = ['src/*.py', 'docs/**', '**/conftest.py', "
                          "'a\\*b.py']\nSPDX-License-Identifier = ['MIT', 'CC0-1.0']\n")
    assert (table.license, table.precedence) == ("MIT AND CC0-1.0", "closest")
    assert [p for p in ("src/x.py", "src/sub/x.py", "docs/a/b.md", "docs", "conftest.py", "t/u/conftest.py",
                        "a*b.py", "axb.py") if table.matches(p)] == [
        "src/x.py", "docs/a/b.md", "conftest.py", "t/u/conftest.py", "a*b.py"]
    (paragraph,) = reuse_dep5("Files: src/*.py lib/?.c\nCopyright: X\nLicense: mit\n text of it\n\nLicense: GPL\n")
    assert (paragraph.license, paragraph.precedence) == ("MIT", "aggregate")
    assert [p for p in ("src/a/b.py", "lib/a.c", "lib/ab.c") if paragraph.matches(p)] == ["src/a/b.py", "lib/a.c"]
    # Wildcards in a row are one: `**/**/**/**/**/*.py` compiled to five `.*` in a row, and rejecting a path cost
    # its length to the fifth power (0.8 s per file of 80 characters, asked for every file of the project).
    (many,), (one,) = (reuse_toml(f"[[annotations]]\npath = '{g}'\nSPDX-License-Identifier = 'MIT'\n")
                       for g in ("**/**/**/**/**/*.py", "**/*.py"))
    assert many.paths.pattern == one.paths.pattern
    assert [p for p in ("a.py", "a/b/c.py", "a/b.txt") if many.matches(p)] == ["a.py", "a/b/c.py"]
    assert reuse_dep5("Files: src/**.py\nLicense: MIT\n")[0].paths.pattern == r"(?:src/.*\.py)"
    # A paragraph or table that names no license gives none (a blank expression was normalised to "None").
    assert reuse_dep5("Files: *\nCopyright: 2024 X\n")[0].license is None
    assert reuse_toml("[[annotations]]\npath = 'x'\nSPDX-License-Identifier = ['MIT', ' ']\n")[0].license == "MIT"
    unreadable = "LicenseRef-Unreadable-REUSE.toml"
    for bad in ("version = [", "[[annotations]]\nSPDX-License-Identifier = 'MIT'\n",
                "[[annotations]]\npath = 'x'\nprecedence = 'closer'\n", "[[annotations]]\npath = 'x'\n"
                "SPDX-License-Identifier = 3\n"):
        assert [(a.license, a.precedence, a.matches("any/file.py")) for a in reuse_toml(bad)] == [
            (unreadable, "aggregate", True)]


def test_an_unmapped_license_classifier_is_not_dropped_beside_a_known_one():
    policy = LicensePolicy()
    mit = "Classifier: License :: OSI Approved :: MIT License\n"
    for other in ("License :: Other/Proprietary License", "License :: Free for non-commercial use",
                  "License :: OSI Approved :: European Union Public Licence 1.2 (EUPL 1.2)"):
        expression, where = from_metadata(_meta(f"{mit}Classifier: {other}\n"))
        assert where == "classifiers" and not policy.allows(expression), other
    # A classifier that names no license changes nothing; permissive ones on the allowlist are known.
    assert from_metadata(_meta(f"{mit}Classifier: License :: OSI Approved\n")) == ("MIT", "classifiers")
    assert from_metadata(_meta("Classifier: License :: OSI Approved :: Zero-Clause BSD (0BSD)\n")) == (
        "0BSD", "classifiers")


def test_filters():
    config = FilterConfig()
    assert language_of("a/b.py") == "python" and language_of("Makefile") == "makefile" and language_of("x.bin") is None
    assert path_reason("pkg/_vendor/six.py", config) == "vendored"
    assert path_reason("web/app.min.js", config) == "minified"
    assert path_reason("api/service_pb2.py", config) == "generated"
    assert path_reason("notes.txt", config) == "not a selected language"
    assert path_reason("pkg/core.py", config) is None
    good = b"def f(x):\n    return x + 1\n"
    assert content_reason(good, config) == (good.decode(), None)
    assert content_reason(b"", config) == (None, "empty")
    assert content_reason(b"\n\n  \n", config) == (None, "empty")
    assert content_reason(b"x\0y", config) == (None, "binary")
    assert content_reason(b"caf\xe9 = 1\n", config) == (None, "invalid utf-8")
    assert content_reason(b"x = 1\n" * 200_000, config) == (None, "oversized")
    assert content_reason(b"x = '" + b"a" * 2000 + b"'\n", config) == (None, "minified")
    assert content_reason(b"x = [\n" + b"  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,\n" * 3 + b"]\n", config)[1] is None
    assert content_reason(b"# " + b"=" * 300 + b"\n" + b"# " + b"-" * 300 + b"\n", config)[1] in ("low alphanumeric", "long lines")
    assert content_reason(b"{}[]();:,.\n" * 30, config) == (None, "low alphanumeric")
    assert content_reason(b"# Code generated by protoc. DO NOT EDIT.\nx = 1\n", config) == (None, "generated")


@pytest.mark.parametrize(
    "line, kind",
    [
        ('key = "AKIAQWERTYUIOPASDFGH"', "AWS_ACCESS_KEY"),
        ("slack = 'xoxb-1234567890-abcdefghij'", "SLACK_TOKEN"),
        ('g = "AIzaSyA1234567890abcdefghijklmnopqrstuv"', "GOOGLE_API_KEY"),
        ('HF = "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"', "HF_TOKEN"),
        ('stripe = "sk_live_abcdefghijklmnopqrstuvwx"', "STRIPE_KEY"),
        ('jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"', "JWT"),
        ('db_password: "Tr0ub4dor&3x"', "PASSWORD"),
        ("API_KEY=4f9a8b7c6d5e4f3a2b1c", "SECRET"),
        # Real Hugging Face tokens mix letters and digits; the letters-only pattern let them through.
        ('headers = {"Authorization": "Bearer hf_94wBhPGp6KrrTH3KDchhKpRxZwd6dmHWLL"}', "HF_TOKEN"),
        ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY", "SECRET"),
    ],
)
def test_secret_patterns(line, kind):
    redacted, found = SecretRedactor().redact(line + "\n")
    assert found == {kind: 1}, (line, redacted)
    assert f"<{kind}>" in redacted


@pytest.mark.parametrize(
    "line",
    ['password = "password"', "token = get_token()", "token_type = 'invalid-obs-local-part'",
     "ENV_TOKEN = 'AWS_SESSION_TOKEN'", "secret = self.config.secret_value", 'api_key = os.environ["API_KEY"]',
     "password=password_input", "max_tokens = 1024",
     # Code and placeholders that were redacted (lines of cryptography, transformers, moto, numpy, huggingface_hub):
     "        private_key: PKCS7PrivateKeyTypes,", "        self.cross_attn_image_to_token = Sam2Attention(config)",
     '    NOPASSWORD = "no-password-required"', '    api_key="your-replicate-api-key",  # pass your key',
     '<assemblyIdentity name="Microsoft.VC90.CRT" publicKeyToken="1fc8b3b9a1e18e3b"></assemblyIdentity>'],
)
def test_secret_false_positives_left_alone(line):
    assert SecretRedactor().redact(line) == (line, {})


def test_minhash_near_and_exact_dedup():
    config = DedupConfig(threshold=0.8)
    hasher = MinHasher(config)
    base = "".join(f"def function_{i}(a, b):\n    return a * {i} + b\n\n" for i in range(60))
    near = base.replace("return a * 7 + b", "return a * 7 - b")
    other = "".join(f"class Model{i}:\n    weight = {i * 13}\n\n" for i in range(60))
    sa, sb, sc = hasher.signature(base), hasher.signature(near), hasher.signature(other)
    assert sa.dtype == np.uint32 and sa.shape == (128,)
    assert np.array_equal(sa, hasher.signature(base))  # deterministic
    assert jaccard(sa, sb) > 0.9 and jaccard(sa, sc) < 0.2
    dedup = Deduplicator(config)
    assert dedup.check("a", exact_key(base), sa) is None
    assert dedup.check("c", exact_key(other), sc) is None
    assert dedup.check("b", exact_key(near), sb) == ("near duplicate", "a")
    assert dedup.check("a2", exact_key(base), sa) == ("exact duplicate", "a")
    exact_only = Deduplicator(DedupConfig(near=False))
    assert exact_only.check("a", exact_key(base), None) is None and exact_only.check("b", exact_key(near), None) is None


@pytest.mark.parametrize(
    "head",
    [
        # Prose and single lines in hand-written code (the heads of ast.py, jinja2/nodes.py, networkx, tomli):
        # a bare substring test for "generated by" / "do not edit" dropped all of these as generated.
        '"""\n    An abstract syntax tree can be generated by passing `ast.PyCF_ONLY_AST` as\n    a flag.\n"""\n',
        '"""AST nodes generated by the parser for the compiler."""\nimport typing\n',
        'def f(G):\n    """The graph was generated by an Erdos-Renyi model."""\n',
        '__all__ = ("loads",)\n__version__ = "2.0.1"  # DO NOT EDIT THIS LINE MANUALLY. LET bump2version DO IT\n',
        "try:\n    from .version import v\nexcept ImportError:\n    # version.py is auto-generated with the git tag\n"
        "    v = None\n",
        "class A:\n    # Note: If frame=None, no auto-generated frame is created.\n    pass\n",
        'def parse(s):\n    """Runs the transformer on the parse tree\n    generated by running ``Lark.parse``."""\n',
    ],
)
def test_hand_written_code_is_not_taken_for_generated(head):
    assert content_reason((head + "x = 1\n").encode(), FilterConfig())[1] is None


@pytest.mark.parametrize(
    "head",
    [
        "# Code generated by protoc-gen-go. DO NOT EDIT.\n",
        "// Code generated by mockery v2. DO NOT EDIT.\n",
        "# Generated by Django 4.2 on 2023-05-01 12:00\n",
        "# file generated by setuptools-scm\n# don't change, don't track in version control\n",
        "# *** Generated by `setup.py antlr`, do not edit by hand ***\n",
        "# ******* WARNING: AUTOGENERATED! ALL EDITS WILL BE LOST ******\n",
        "# *** PLEASE DO NOT MODIFY DIRECTLY: Automatically generated code ***\n",
        "# This file was generated by libcst.codegen.gen_matcher_classes\n",
        '"""\nThis file is autogenerated by scripts/get_css_properties.py\n"""\n',
        "# ****** THIS IS A GENERATED FILE, DO NOT EDIT. ******\n",
        "# Inference code generated from the JSON schema spec in @huggingface/tasks.\n",
        "/*\n * This header file is automatically generated by the cmake script during build.\n */\n",
        "// @generated by the build\n",
        "# DO NOT EDIT THIS FILE!\n",
    ],
)
def test_generated_notices_are_recognised(head):
    assert content_reason((head + "x = 1\n").encode(), FilterConfig()) == (None, "generated")


KEY_LINES = ("MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
             "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQJAIJLixBy2qpFoS4DSmoEm\n")


@pytest.mark.parametrize(
    "code",
    [
        # cryptography's ssh.py: the block ran from one constant to the next and deleted `_SK_END = b"`.
        '_SK_START = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n_SK_END = b"-----END OPENSSH PRIVATE KEY-----"\n',
        # rsa's pem.py docstring: the markers are named, not a key.
        "    when your file has '-----BEGIN RSA PRIVATE KEY-----' and\n    '-----END RSA PRIVATE KEY-----' markers.\n",
    ],
)
def test_pem_markers_without_a_key_are_left_alone(code):
    assert SecretRedactor().redact(code) == (code, {})


def test_pem_private_keys_are_redacted_whole_and_only_them():
    redactor = SecretRedactor()
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{KEY_LINES}-----END RSA PRIVATE KEY-----"
    # A marker mentioned in code before a real key: the match must not start there and swallow the code between.
    code = f'if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n    parse(line)\nKEY = """{block}"""\n'
    assert redactor.redact(code) == (
        'if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n    parse(line)\nKEY = """<PRIVATE_KEY>"""\n',
        {"PRIVATE_KEY": 1})
    headers = "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"
    encrypted = block.replace("-----\nMIIB", f"-----\n{headers}MIIB")
    assert redactor.redact(f"K = '''{encrypted}'''\n") == ("K = '''<PRIVATE_KEY>'''\n", {"PRIVATE_KEY": 1})
    # Concatenated string lines with `\n` escapes: the quotes between the lines go with the key, the code stays valid.
    lines = KEY_LINES.splitlines()
    concatenated = ('KEY = (\n    "-----BEGIN PRIVATE KEY-----\\n"\n' + "".join(f'    "{l}\\n"\n' for l in lines)
                    + '    "-----END PRIVATE KEY-----\\n"\n)\n')
    assert redactor.redact(concatenated) == ('KEY = (\n    "<PRIVATE_KEY>\\n"\n)\n', {"PRIVATE_KEY": 1})
    # A key without its END line (truncated) is still a key; the code after it stays.
    truncated = f'KEY = "-----BEGIN EC PRIVATE KEY-----\\n{lines[0]}\\n{lines[1][:12]}"\nprint(KEY)\n'
    assert redactor.redact(truncated) == ('KEY = "<PRIVATE_KEY>"\nprint(KEY)\n', {"PRIVATE_KEY": 1})
