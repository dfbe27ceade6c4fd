"""Sources of code: a path becomes projects (the Python standard library, installed distributions, a git
repository, a plain directory), each with its files and the evidence for its license.

A directory holding `*.dist-info` folders (a site-packages) yields one project per installed distribution,
with the files its RECORD lists. A directory with `os.py` and `abc.py` at the top is the Python standard library
(PSF-2.0), walked without its `site-packages`. A directory with `.git` is a repository (files from
`git ls-files` when git is available). Anything else is one project. Symlinks are not followed: links to files
are read if they resolve inside the source, and broken links or loops are reported as skipped. A folder with a
license file of its own (code copied in) licenses its files, and a NOTICE file that credits files to a license
licenses those (`Project.license_of`). A REUSE project (a `LICENSES/` folder of texts named by SPDX id, REUSE.toml,
.reuse/dep5) is licensed by all the ids it declares, combined with AND.
"""

from __future__ import annotations

import csv
import email.parser
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from mellum.data.filters import language_of
from mellum.data.license import (conjoin, detect_text, from_metadata, normalize, notice_credits, reuse_declared,
                                 reuse_ids, spdx_named)

# Directories never walked (caches, VCS metadata, environments).
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".mypy_cache", ".pytest_cache", ".tox", ".venv", "venv",
                       ".eggs", "node_modules", ".idea", ".vscode", "site-packages", "dist-packages"})
LICENSE_NAMES = ("license", "licence", "copying", "copyright", "notice", "unlicense")


@dataclass
class Project:
    """One unit of licensing: its files (absolute paths with their project-relative names) and its license."""

    name: str
    root: Path
    kind: str  # "stdlib" | "distribution" | "repository" | "directory"
    source: str  # the label of the --source it came from (mixture weights are per source)
    files: list[tuple[Path, str]] = field(default_factory=list)  # (absolute path, relative path)
    license: str | None = None
    license_source: str = "none"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) found while walking
    # A folder inside the project with a license file of its own (code copied in from elsewhere) → that license.
    folder_licenses: dict[str, str] = field(default_factory=dict)
    # A file that a NOTICE file credits to a license ("`formats.py` ... licensed under MPL-2.0") → that license.
    credits: dict[str, str] = field(default_factory=dict)

    def license_of(self, rel: str) -> str | None:
        """The license of a file: a NOTICE's credit of it, else the nearest enclosing folder's own license, else the
        project's. The file's own head (SPDX tags, notices) is read with its text (`mellum.data.corpus`)."""
        if rel in self.credits:
            return self.credits[rel]
        parts = PurePosixPath(rel).parent.parts
        for depth in range(len(parts), 0, -1):
            found = self.folder_licenses.get("/".join(parts[:depth]))
            if found:
                return found
        return self.license


def discover(path: str | os.PathLike, label: str = "code") -> list[Project]:
    """The projects under one source path; clear errors for missing paths, files, loops and empty sources."""
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"source {path} is a broken symbolic link") from None
        raise FileNotFoundError(f"source {path} does not exist") from None
    except OSError as exc:  # ELOOP and friends
        raise ValueError(f"source {path} cannot be read: {exc.strerror}") from None
    if not path.is_dir():
        raise NotADirectoryError(f"source {path} is not a directory (pass a project, repository or site-packages dir)")
    root = path.resolve()
    if any(root.glob("*.dist-info")):
        projects = _distributions(root, label)
    elif (root / "os.py").is_file() and (root / "abc.py").is_file():
        projects = [_stdlib(root, label)]
    else:
        projects = [_directory(root, label)]
    if not projects or not any(p.files for p in projects):
        raise ValueError(f"source {path} contains no files to read")
    for project in projects:
        project.folder_licenses = _folder_licenses(project)
        project.credits, uncredited = _credits(project)
        for folder, spdx in uncredited.items():
            project.folder_licenses[folder] = conjoin([project.folder_licenses.get(folder), spdx])
    return projects


# ---- kinds of source ------------------------------------------------------------------------------------


def _stdlib(root: Path, label: str) -> Project:
    project = Project(name="python-stdlib", root=root, kind="stdlib", source=label)
    _walk(root, project)
    # The standard library ships the PSF license text (LICENSE.txt); it is PSF-2.0 whatever else it bundles.
    project.license, project.license_source = "PSF-2.0", "Python standard library"
    return project


def _directory(root: Path, label: str) -> Project:
    kind = "repository" if (root / ".git").exists() else "directory"
    project = Project(name=root.name, root=root, kind=kind, source=label)
    listed = _git_files(root) if kind == "repository" else None
    if listed is None:
        _walk(root, project)
    else:
        for rel in listed:
            _add_file(root, root / rel, project)
    project.license, project.license_source = _license_from_files(root, [rel for _, rel in project.files])
    return project


def _distributions(site: Path, label: str) -> list[Project]:
    projects = []
    for info in sorted(site.glob("*.dist-info")):
        meta_file = info / "METADATA"
        if not meta_file.is_file():
            continue
        meta = email.parser.Parser().parsestr(meta_file.read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name = meta.get("Name") or info.name.split("-")[0]
        project = Project(name=name, root=site, kind="distribution", source=label)
        license_files, reuse_files = [], []
        for rel in _record(info):
            target = (site / rel)
            if ".." in Path(rel).parts or Path(rel).is_absolute() or not rel or rel.endswith("/"):
                continue  # files outside site-packages (scripts, absolute data files), directories
            if Path(rel).parts[0] == info.name:
                if Path(rel).parent.name == "LICENSES":  # PEP 639 keeps a REUSE project's LICENSES/ in licenses/
                    reuse_files.append(target)
                elif Path(rel).name.lower().startswith(LICENSE_NAMES) or "licenses" in Path(rel).parts:
                    license_files.append(target)
                continue
            _add_file(site, target, project)
        if not any(spdx_named(path.name) for path in reuse_files):
            license_files, reuse_files = license_files + reuse_files, []  # bundled licenses, not REUSE's
        expression, where = from_metadata(meta)
        refined = _first_license_text(license_files)
        reuse = conjoin([spdx for path in sorted(reuse_files) for spdx in reuse_ids(path.name, _read(path))])
        if expression is None and (refined or reuse):
            expression = conjoin([refined, reuse])
            where = "license file + REUSE" if refined and reuse else "license file" if refined else "REUSE"
        elif expression == "BSD-3-Clause" and where == "classifiers" and refined in ("BSD-2-Clause", "BSD-3-Clause"):
            expression, where = refined, "classifiers + license file"  # the generic BSD classifier, made precise
        if reuse and where in ("License", "License text", "classifiers", "classifiers + license file"):
            # A License-Expression covers every license file (PEP 639); a short name or classifiers may not.
            expression, where = conjoin([expression, reuse]), f"{where} + REUSE"
        project.license, project.license_source = (normalize(expression) if expression else None), where
        projects.append(project)
    return projects


def _record(info: Path) -> list[str]:
    record = info / "RECORD"
    if not record.is_file():
        return []
    with open(record, newline="", encoding="utf-8", errors="replace") as f:
        return [row[0] for row in csv.reader(f) if row]


def _git_files(root: Path) -> list[str] | None:
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, timeout=60, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return sorted(p for p in out.stdout.decode("utf-8", errors="replace").split("\0") if p)


# ---- walking ----------------------------------------------------------------------------------------------


def _walk(root: Path, project: Project) -> None:
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith((".dist-info", ".egg-info")))
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                project.skipped.append((os.path.relpath(os.path.join(dirpath, d), root), "symlinked directory not followed"))
        for name in sorted(filenames):
            _add_file(root, Path(dirpath) / name, project)
    for err in errors:
        project.skipped.append((os.path.relpath(err.filename or str(root), root), f"unreadable directory: {err.strerror}"))


def _add_file(root: Path, path: Path, project: Project) -> None:
    rel = os.path.relpath(path, root)
    if path.is_symlink():
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):  # RuntimeError: symlink loop on older Pythons
            project.skipped.append((rel, "broken symlink or symlink loop"))
            return
        if not resolved.is_relative_to(root):
            project.skipped.append((rel, "symlink points outside the source"))
            return
        if not resolved.is_file():
            return
    elif not path.is_file():
        return
    project.files.append((path, rel))


def _is_license_file(rel: str) -> bool:
    # LICENSE, COPYING.txt, LICENSE-MIT, NOTICE.md; not source files that happen to be named so (license.py holds
    # the phrases of every license it detects).
    name = PurePosixPath(rel).name
    return name.lower().startswith(LICENSE_NAMES) and language_of(name) in (None, "markdown", "restructuredtext")


def _is_notice(rel: str) -> bool:
    return _is_license_file(rel) and PurePosixPath(rel).name.lower().startswith("notice")


def _folder_licenses(project: Project) -> dict[str, str]:
    """Folders below the project root holding a license file that names a license, or REUSE files of their own: a
    permissive repository that vendors a GPL library under `libs/gplthing/` (with its COPYING) must not pass that
    code off under its own license. License files that name no known license leave the folder's license as is, and
    so do NOTICE files: they credit single files (`_credits`), not the folder."""
    by_folder: dict[str, list[Path]] = {}
    for path, rel in project.files:
        folder = PurePosixPath(rel).parent
        if folder.as_posix() != "." and _is_license_file(rel) and not _is_notice(rel) and folder.name != "LICENSES":
            by_folder.setdefault(folder.as_posix(), []).append(path)
    files = {rel: path for path, rel in project.files}
    reuse_roots = set()
    for rel in files:
        if PurePosixPath(rel).parent.name == "LICENSES":
            reuse_roots.add(PurePosixPath(rel).parent.parent.as_posix())
        elif PurePosixPath(rel).name == "REUSE.toml":
            reuse_roots.add(PurePosixPath(rel).parent.as_posix())
    found = {}
    for folder in sorted((set(by_folder) | reuse_roots) - {"."}):
        found[folder] = conjoin([_first_license_text(sorted(by_folder.get(folder, []))), _reuse(files, folder)])
    return {folder: spdx for folder, spdx in found.items() if spdx}


def _credits(project: Project) -> tuple[dict[str, str], dict[str, str]]:
    """Files that NOTICE files credit to a license, and folders whose NOTICE credits a file the folder does not hold
    (a typo or a rename: setuptools' `_validate_pyproject/NOTICE` credits `format.py` for `formats.py`): which file
    it meant cannot be told, so the credit covers the folder's files that no credit names. At the project's root
    such a credit changes nothing (it would relicense the whole project)."""
    files = {rel: path for path, rel in project.files}
    credited: dict[str, str] = {}
    uncredited: dict[str, str] = {}
    for rel, path in sorted(files.items()):
        if not _is_notice(rel):
            continue
        folder = PurePosixPath(rel).parent
        for name, spdx in notice_credits(_read(path)).items():
            target = (folder / name).as_posix()
            target = target if target in files else name  # a path from the project's root
            if target in files:
                credited[target] = conjoin([credited.get(target), spdx])
            elif language_of(name) is not None and folder.as_posix() != ".":
                uncredited[folder.as_posix()] = conjoin([uncredited.get(folder.as_posix()), spdx])
    return credited, uncredited


def _reuse(files: dict[str, Path], folder: str) -> str | None:
    """The licenses a REUSE folder declares: its `LICENSES/` texts' ids, REUSE.toml and .reuse/dep5, with AND. A
    `LICENSES/` folder is REUSE's beside a REUSE.toml or dep5, or when a file in it is named by an SPDX id."""
    prefix = "" if folder == "." else f"{folder}/"
    texts = [rel for rel in sorted(files)
             if rel.startswith(f"{prefix}LICENSES/") and "/" not in rel[len(prefix) + len("LICENSES/"):]]
    declared = []
    for name, dep5 in (("REUSE.toml", False), (".reuse/dep5", True)):
        if prefix + name in files:
            declared += reuse_declared(_read(files[prefix + name]), dep5)
    if not declared and not any(spdx_named(PurePosixPath(rel).name) for rel in texts):
        return None
    found = [spdx for rel in texts for spdx in reuse_ids(PurePosixPath(rel).name, _read(files[rel]))] + declared
    return normalize(conjoin(found)) if found else None


def _license_from_files(root: Path, rels: list[str]) -> tuple[str | None, str]:
    top = sorted(r for r in rels if "/" not in r and _is_license_file(r))
    found = _first_license_text([root / r for r in top])
    reuse = _reuse({rel: root / rel for rel in rels}, ".")
    if found and reuse:
        return normalize(conjoin([found, reuse])), "license file + REUSE"
    if reuse:
        return reuse, "REUSE"
    if found:
        return found, "license file"
    # No license file: an sdist's PKG-INFO carries the same headers as an installed distribution's METADATA.
    if (root / "PKG-INFO").is_file():
        meta = email.parser.Parser().parsestr((root / "PKG-INFO").read_text(errors="replace"), headersonly=True)
        expression, where = from_metadata(meta)
        if expression:
            return normalize(expression), where
    return None, "none"


def _first_license_text(paths: list[Path]) -> str | None:
    for path in paths:
        found = detect_text(_read(path))
        if found:
            return found
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def iter_files(projects: list[Project]) -> Iterator[tuple[Project, Path, str]]:
    for project in projects:
        for path, rel in project.files:
            yield project, path, rel
