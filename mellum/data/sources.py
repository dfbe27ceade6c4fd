"""Sources of code: a path becomes projects (the Python standard library, installed distributions, a git
repository, a plain directory), each with its files and the evidence for its license.

A directory holding `*.dist-info` folders (a site-packages) yields one project per installed distribution,
with the files its RECORD lists. A directory with `os.py` and `abc.py` at the top is the Python standard library
(PSF-2.0), walked without its `site-packages`. A directory with `.git` is a repository (files from
`git ls-files` when git is available). Anything else is one project. Symlinks are not followed: links to files
are read if they resolve inside the source, and broken links or loops are reported as skipped. A folder with a
license file of its own (code copied in) licenses its files (`Project.license_of`).
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
from mellum.data.license import detect_text, from_metadata, normalize

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

    def license_of(self, rel: str) -> str | None:
        """The license of a file: the nearest enclosing folder's own license file's, else the project's."""
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
        license_files = []
        for rel in _record(info):
            target = (site / rel)
            if ".." in Path(rel).parts or Path(rel).is_absolute() or not rel or rel.endswith("/"):
                continue  # files outside site-packages (scripts, absolute data files), directories
            if Path(rel).parts[0] == info.name:
                if Path(rel).name.lower().startswith(LICENSE_NAMES) or "licenses" in Path(rel).parts:
                    license_files.append(target)
                continue
            _add_file(site, target, project)
        expression, where = from_metadata(meta)
        refined = _first_license_text(license_files)
        if expression is None and refined:
            expression, where = refined, "license file"
        elif expression == "BSD-3-Clause" and where == "classifiers" and refined in ("BSD-2-Clause", "BSD-3-Clause"):
            expression, where = refined, "classifiers + license file"  # the generic BSD classifier, made precise
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


def _folder_licenses(project: Project) -> dict[str, str]:
    """Folders below the project root holding a license file that names a license: a permissive repository that
    vendors a GPL library under `libs/gplthing/` (with its COPYING) must not pass that code off under its own
    license. License files that name no known license leave the folder's license as is, and so do NOTICE files:
    they credit single files ("`extra_validations.py` ... licensed under MPL-2.0" in setuptools/config), not the
    folder."""
    by_folder: dict[str, list[Path]] = {}
    for path, rel in project.files:
        folder = PurePosixPath(rel).parent.as_posix()
        if folder != "." and _is_license_file(rel) and not PurePosixPath(rel).name.lower().startswith("notice"):
            by_folder.setdefault(folder, []).append(path)
    found = {folder: _first_license_text(sorted(paths)) for folder, paths in sorted(by_folder.items())}
    return {folder: spdx for folder, spdx in found.items() if spdx}


def _license_from_files(root: Path, rels: list[str]) -> tuple[str | None, str]:
    top = sorted(r for r in rels if "/" not in r and _is_license_file(r))
    found = _first_license_text([root / r for r in top])
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
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found = detect_text(text)
        if found:
            return found
    return None


def iter_files(projects: list[Project]) -> Iterator[tuple[Project, Path, str]]:
    for project in projects:
        for path, rel in project.files:
            yield project, path, rel
