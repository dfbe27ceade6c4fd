"""`mellum data build` on fixture projects with known licenses, planted duplicates and planted secrets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mellum.cli import main
from mellum.data.corpus import BuildConfig, build_corpus, read_corpus, read_report

FIXTURES = Path(__file__).parent / "fixtures"
PROJECTS = ["mit_project", "apache_project", "gpl_project", "nolicense_project", "site"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "corpus"
    report = build_corpus([str(FIXTURES / p) for p in PROJECTS], out, BuildConfig(workers=1), progress=False)
    return out, report, list(read_corpus(out))


def test_licenses_decide_which_projects_are_kept(built):
    out, report, records = built
    projects = {p["name"]: p for p in report["projects"]}
    assert {n for n, p in projects.items() if p["kept"]} == {"mit_project", "apache_project", "okdist", "dualdist", "classicdist"}
    assert report["excluded_by_reason"] == {
        "license not allowed: GPL-3.0-only": ["gpldist"],
        "license not allowed: GPL-3.0-or-later": ["gpl_project"],
        "license unknown": ["nolicense_project"],
    }
    assert projects["mit_project"]["license"] == "MIT" and projects["mit_project"]["license_source"] == "license file"
    assert projects["okdist"]["license_source"] == "License-Expression"
    assert projects["classicdist"]["license"] == "MIT" and projects["classicdist"]["license_source"] == "classifiers"
    assert projects["dualdist"]["license"] == "MIT OR GPL-2.0-only"  # one permissive alternative suffices
    assert not any(r["project"] in ("gpl_project", "gpldist", "nolicense_project") for r in records)
    # Per-file SPDX headers override the project license: the GPL file is dropped, the MIT one kept as MIT.
    by_path = {(r["project"], r["path"]): r for r in records}
    assert ("apache_project", "src/gpl_part.py") not in by_path
    assert by_path[("apache_project", "src/mit_part.py")]["license"] == "MIT"
    assert by_path[("apache_project", "src/app.py")]["license"] == "Apache-2.0"
    assert by_path[("okdist", "okdist/__init__.py")]["language"] == "python"


def test_exact_set_of_kept_files_and_skip_reasons(built):
    _, report, records = built
    assert sorted((r["project"], r["path"]) for r in records) == sorted([
        ("mit_project", "pkg/__init__.py"), ("mit_project", "pkg/core.py"), ("mit_project", "pkg/keys.py"),
        ("mit_project", "pkg/settings.py"), ("apache_project", "src/app.py"), ("apache_project", "src/mit_part.py"),
        ("classicdist", "classicdist.py"), ("dualdist", "dualdist/core.py"), ("okdist", "okdist/__init__.py"),
    ])
    assert report["skipped_by_reason"] == {
        "not a selected language": 3, "generated": 2, "minified": 1, "vendored": 1, "file license GPL-2.0-only": 1,
    }
    for r in records:
        assert set(r) == {"project", "path", "language", "license", "source", "text"}


def test_duplicates_removed_within_and_across_projects(built):
    _, report, _ = built
    assert report["totals"]["exact_duplicates"] == 2 and report["totals"]["near_duplicates"] == 1
    assert {(d["kind"], d["file"], d["original"]) for d in report["duplicate_examples"]} == {
        ("exact duplicate", "mit_project/pkg/core_copy.py", "mit_project/pkg/core.py"),
        ("near duplicate", "mit_project/pkg/core_near.py", "mit_project/pkg/core.py"),
        ("exact duplicate", "apache_project/src/geometry.py", "mit_project/pkg/core.py"),
    }


def test_secrets_redacted_and_counted(built):
    _, report, records = built
    assert report["secrets_by_kind"] == {"PRIVATE_KEY": 1, "AWS_ACCESS_KEY": 1, "GITHUB_TOKEN": 1, "PASSWORD": 1}
    assert report["totals"]["files_with_secrets"] == 2
    text = {r["path"]: r["text"] for r in records}
    settings = text["pkg/settings.py"]
    assert 'AWS_ACCESS_KEY_ID = "<AWS_ACCESS_KEY>"' in settings
    assert 'DATABASE_PASSWORD = "<PASSWORD>"' in settings
    assert 'GITHUB_TOKEN = "<GITHUB_TOKEN>"' in settings
    assert 'password = "password"' in settings and "token = get_token()" in settings  # not secrets
    assert "AKIA" not in settings and "Xk9#" not in settings
    assert 'KEY = """<PRIVATE_KEY>"""' in text["pkg/keys.py"] and "MIIBOg" not in text["pkg/keys.py"]


def test_report_files_written(built):
    out, report, _ = built
    assert read_report(out) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert "license not allowed: GPL-3.0-or-later" in md and "| mit_project | directory | MIT |" in md
    assert sorted(p.name for p in out.iterdir()) == ["files.jsonl.zst", "report.json", "report.md"]


def test_existing_corpus_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "corpus"
    shutil.copytree(FIXTURES / "site", tmp_path / "site")
    args = ["data", "build", "--quiet", "--workers", "1", "--source", str(tmp_path / "site"), "--out", str(out)]
    assert main(args) == 0
    first = (out / "report.json").read_text()
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "report.json").read_text() == first
    assert main(args + ["--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]  # no temp or backup left


def test_force_replaces_only_an_earlier_output_never_a_file_or_a_source(tmp_path, capsys):
    project = tmp_path / "proj"
    shutil.copytree(FIXTURES / "mit_project", project)
    not_a_corpus = tmp_path / "notes.txt"
    not_a_corpus.write_text("mine\n")
    for out, message in [(not_a_corpus, "is not a directory"), (project, "is or contains the source"),
                         (tmp_path, "is or contains the source")]:
        assert main(["data", "build", "--quiet", "--force", "--source", f"code={project}", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not_a_corpus.read_text() == "mine\n"
    assert (project / "pkg" / "core.py").is_file() and not (project / "files.jsonl.zst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "proj"]  # no temp or backup left


def test_spdx_header_in_a_docstring_excludes_the_file(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    shutil.copy(FIXTURES / "mit_project" / "LICENSE", project / "LICENSE")
    (project / "ok.py").write_text("def double(x):\n    return 2 * x\n")
    (project / "copyleft.py").write_text('"""SPDX-License-Identifier: GPL-3.0-only"""\n\n\ndef triple(x):\n'
                                         "    return 3 * x\n")
    report = build_corpus([str(project)], tmp_path / "corpus", BuildConfig(workers=1), progress=False)
    assert [r["path"] for r in read_corpus(tmp_path / "corpus")] == ["ok.py"]
    assert report["skipped_by_reason"]["file license GPL-3.0-only"] == 1


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (str(empty), "contains no files"),
        (str(loop), "cannot be read"),
        (str(FIXTURES / "mit_project" / "LICENSE"), "is not a directory"),
    ]
    for source, message in cases:
        assert main(["data", "build", "--quiet", "--source", source, "--out", out]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


def test_unreadable_invalid_and_looping_files_are_reported(tmp_path):
    project = tmp_path / "proj"
    shutil.copytree(FIXTURES / "apache_project", project)
    (project / "src" / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    (project / "src" / "blob.py").write_bytes(b"\x00\x01\x02binary")
    os.symlink(project / "src" / "self_loop.py", project / "src" / "self_loop.py")
    os.symlink("/etc/hostname", project / "src" / "outside.py")
    (project / "src" / "locked.py").write_text("x = 1\n")
    os.chmod(project / "src" / "locked.py", 0)
    report = build_corpus([str(project)], tmp_path / "c", BuildConfig(workers=1), progress=False)
    skipped = report["projects"][0]["skipped"]
    assert skipped["invalid utf-8"] == 1 and skipped["binary"] == 1
    assert skipped["broken symlink or symlink loop"] == 1 and skipped["symlink points outside the source"] == 1
    if os.geteuid() != 0:  # root reads anything
        assert skipped["unreadable"] == 1
    kept = {r["path"] for r in read_corpus(tmp_path / "c")}
    assert "src/app.py" in kept and "src/latin1.py" not in kept


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import mellum.data.corpus as corpus

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(corpus, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        build_corpus([str(FIXTURES / "apache_project")], tmp_path / "c", BuildConfig(workers=1), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_worker_pool_gives_the_same_corpus(tmp_path, built):
    out, report, records = built
    many = BuildConfig(workers=2, chunk_files=1)
    # Enough tasks to use the pool (it is skipped below 64 files): repeat the fixture projects under new names.
    for i in range(8):
        for p in ("mit_project", "apache_project"):
            shutil.copytree(FIXTURES / p, tmp_path / f"{p}{i}")
    sources = [str(FIXTURES / p) for p in PROJECTS] + [str(tmp_path / f"{p}{i}") for i in range(8) for p in ("mit_project", "apache_project")]
    pooled = build_corpus(sources, tmp_path / "c", many, progress=False)
    assert list(read_corpus(tmp_path / "c"))[: len(records)] == records
    assert pooled["totals"]["files_kept"] == report["totals"]["files_kept"]  # every copy is an exact duplicate
    # Each copy of mit_project repeats 6 candidate files (core_near included), each apache_project copy 3.
    assert pooled["totals"]["exact_duplicates"] == report["totals"]["exact_duplicates"] + 8 * (6 + 3)
    assert pooled["totals"]["near_duplicates"] == report["totals"]["near_duplicates"]


def test_git_repository_source_reads_tracked_files_only(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    shutil.copytree(FIXTURES / "apache_project", repo)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "LICENSE", "src/app.py"], check=True)
    report = build_corpus([str(repo)], tmp_path / "c", BuildConfig(workers=1), progress=False)
    project = report["projects"][0]
    assert project["kind"] == "repository" and project["license"] == "Apache-2.0"
    assert [r["path"] for r in read_corpus(tmp_path / "c")] == ["src/app.py"]  # untracked files are not read


def test_record_entries_outside_site_packages_are_not_read(tmp_path):
    # RECORD lists files installed elsewhere by absolute path; `site / "/abs"` read them into the corpus.
    outside = tmp_path / "outside.py"
    outside.write_text("def elsewhere():\n    return 42\n")
    site = tmp_path / "site"
    (site / "foo-1.0.dist-info").mkdir(parents=True)
    (site / "foo").mkdir()
    (site / "foo-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nLicense-Expression: MIT\n")
    (site / "foo-1.0.dist-info" / "RECORD").write_text(f"foo/__init__.py,,\n{outside},,\n../outside.py,,\n")
    (site / "foo" / "__init__.py").write_text("def inside():\n    return 1\n")
    build_corpus([str(site)], tmp_path / "corpus", BuildConfig(workers=1), progress=False)
    assert [r["path"] for r in read_corpus(tmp_path / "corpus")] == ["foo/__init__.py"]


def test_a_folder_with_its_own_license_file_takes_that_license(tmp_path):
    # A permissive project that copies a GPL library in (not under a vendor/ name) with its COPYING: the library's
    # files were kept under the project's MIT. A NOTICE only credits single files; license.py is code, not a license.
    gpl_text = (FIXTURES / "gpl_project" / "COPYING").read_text()
    project = tmp_path / "proj"
    (project / "src" / "libs" / "gplthing" / "sub").mkdir(parents=True)
    (project / "src" / "libs" / "bsdthing").mkdir(parents=True)
    (project / "src" / "config").mkdir(parents=True)
    shutil.copy(FIXTURES / "mit_project" / "LICENSE", project / "LICENSE")
    (project / "src" / "app.py").write_text("def double(x):\n    return 2 * x\n")
    (project / "src" / "libs" / "gplthing" / "COPYING").write_text(gpl_text)
    (project / "src" / "libs" / "gplthing" / "core.py").write_text("def gpl_core(a, b):\n    return a * b - 3\n")
    (project / "src" / "libs" / "gplthing" / "sub" / "deep.py").write_text("def gpl_deep(a):\n    return a ** 5\n")
    (project / "src" / "libs" / "gplthing" / "relicensed.py").write_text(
        "# SPDX-License-Identifier: MIT\ndef mit_inside(a):\n    return a + 11\n")
    (project / "src" / "libs" / "bsdthing" / "LICENSE.txt").write_text(BSD3_TEXT)
    (project / "src" / "libs" / "bsdthing" / "bsd.py").write_text("def bsd_part(q):\n    return q - 1\n")
    (project / "src" / "config" / "NOTICE").write_text("`schema.json` is from validate-pyproject, licensed under "
                                                       "the Mozilla Public License 2.0\n")
    (project / "src" / "config" / "setup_cfg.py").write_text("def read_cfg(path):\n    return open(path).read()\n")
    (project / "src" / "config" / "schema.json").write_text('{"type": "object"}\n')  # the file the NOTICE credits
    (project / "src" / "license.py").write_text('RULES = ["gnu general public license", "version 3"]\n')
    report = build_corpus([str(project)], tmp_path / "corpus", BuildConfig(workers=1), progress=False)
    kept = {r["path"]: r["license"] for r in read_corpus(tmp_path / "corpus")}
    assert kept == {"src/app.py": "MIT", "src/libs/gplthing/relicensed.py": "MIT", "src/license.py": "MIT",
                    "src/libs/bsdthing/bsd.py": "BSD-3-Clause", "src/config/setup_cfg.py": "MIT"}
    assert report["skipped_by_reason"]["file license GPL-3.0-or-later"] == 2


BSD3_TEXT = """Copyright (c) 2020, Someone. All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted provided that the
following conditions are met: ... Neither the name of the copyright holder nor the names of its contributors may be
used to endorse or promote products derived from this software without specific prior written permission.
"""


def test_a_distribution_folder_with_its_own_license_file_takes_that_license(tmp_path):
    site = tmp_path / "site"
    (site / "foo-1.0.dist-info").mkdir(parents=True)
    (site / "foo" / "copied").mkdir(parents=True)
    (site / "foo-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nLicense-Expression: MIT\n")
    (site / "foo-1.0.dist-info" / "RECORD").write_text(
        "foo/__init__.py,,\nfoo/copied/__init__.py,,\nfoo/copied/COPYING,,\nfoo-1.0.dist-info/METADATA,,\n")
    (site / "foo" / "__init__.py").write_text("def inside():\n    return 1\n")
    (site / "foo" / "copied" / "__init__.py").write_text("def copied_gpl_code(z):\n    return z * 9\n")
    (site / "foo" / "copied" / "COPYING").write_text((FIXTURES / "gpl_project" / "COPYING").read_text())
    build_corpus([str(site)], tmp_path / "corpus", BuildConfig(workers=1), progress=False)
    assert [r["path"] for r in read_corpus(tmp_path / "corpus")] == ["foo/__init__.py"]


def test_damaged_corpus_and_shard_metadata_are_named(built, tmp_path):
    """A corpus cut short or a meta.json edited by hand gave a bare JSON error that named no file."""
    import zstandard

    from mellum.data.shards import ShardSet

    damaged = tmp_path / "damaged"
    shutil.copytree(built[0], damaged)
    lines = [json.dumps({"text": "x = 1\n"}), "{not json"]
    (damaged / "files.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    with pytest.raises(ValueError, match=r"files\.jsonl\.zst cannot be read near record 2 .*build it again"):
        list(read_corpus(damaged))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text('{"format": 1, "dtype": ')
    with pytest.raises(ValueError, match=r"meta\.json is not valid JSON"):
        ShardSet(shards)
    (shards / "meta.json").write_text("[]")
    with pytest.raises(ValueError, match="unsupported shard format 'list'"):
        ShardSet(shards)
