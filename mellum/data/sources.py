"""Sources of code: a path becomes projects (the Python standard library, installed distributions, a git
repository, a plain directory), each with its files and the evidence for its license.

A directory holding `*.dist-info` folders (a site-packages) yields one project per installed distribution,
with the files its RECORD lists. A directory with `os.py` and `abc.py` at the top is the Python standard library
(PSF-2.0), walked without its `site-packages`. A directory with `.git` is a repository (files from
`git ls-files` when git is available). Anything else is one project. Symlinks are not followed: links to files
are read if they resolve inside the source, and broken links or loops are reported as skipped. A folder with a
license file of its own (code copied in) licenses its files, and a NOTICE file that credits files to a license
licenses those (`Project.license_of`). The files of a REUSE project (a `LICENSES/` folder of texts named by SPDX id,
REUSE.toml, .reuse/dep5), or of a folder with REUSE files of its own, are licensed one by one (`reuse.Reuse`).
"""

from __future__ import annotations

import csv
import email.parser
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterator

from mellum.data.filters import language_of
from mellum.data.license import conjoin, detect_text, from_metadata, normalize, spdx_header
from mellum.data.notices import notice_credits
from mellum.data.reuse import Reuse, reuse_dep5, reuse_ids, reuse_toml, spdx_named

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
    # The project's root (".") or a folder with REUSE files of its own → the REUSE licensing of the files below it.
    reuse: dict[str, Reuse] = field(default_factory=dict)

    def license_of(self, rel: str, tags: str | None = None) -> str | None:
        """The license of a file, given the SPDX tags of its head (read with its text, `mellum.data.corpus`). Below a
        REUSE root: what REUSE gives it (`Reuse.license_of`), with the license files of folders on the way there
        (code copied in: REUSE ignores them) and a NOTICE's credit of it. Elsewhere: its tags (with a NOTICE's credit
        of it: both apply), else the credit, else the nearest enclosing folder's own license, else the project's."""
        folders = _folders(rel.rpartition("/")[0])
        credit = self.credits.get(rel)
        for depth, folder in enumerate(folders):  # nearest first, "." last
            if folder in self.reuse:
                below = rel if folder == "." else rel[len(folder) + 1 :]
                nearer = [self.folder_licenses[f] for f in folders[: depth + 1] if f in self.folder_licenses]
                return conjoin([self.reuse[folder].license_of(below, tags), *nearer, credit])
        if tags:
            return conjoin([tags, credit])
        return credit or next((self.folder_licenses[f] for f in folders if f in self.folder_licenses), self.license)


@lru_cache(maxsize=4096)
def _folders(parent: str) -> tuple[str, ...]:
    """The folders a file in `parent` sits in, nearest first, "." last (asked for every file: files share them)."""
    path = PurePosixPath(parent)
    return (path.as_posix(), *(folder.as_posix() for folder in path.parents))


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
        if "." in project.reuse and project.license:  # files have their own; the project's is all of them, with AND
            project.license_source += ", per file"
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
    files = {rel: path for path, rel in project.files}
    stated, where = _license_from_files(root, files)
    project.reuse = _reuse_roots(files, stated)
    reuse = project.reuse.get(".")
    if reuse is not None and reuse.whole:
        stated, where = reuse.whole, f"{where} + REUSE" if stated else "REUSE"
    project.license, project.license_source = stated, where
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
        if expression is None and refined:
            expression, where = refined, "license file"
        elif expression == "BSD-3-Clause" and where == "classifiers" and refined in ("BSD-2-Clause", "BSD-3-Clause"):
            expression, where = refined, "classifiers + license file"  # the generic BSD classifier, made precise
        files = {rel: path for path, rel in project.files}
        project.reuse = _reuse_roots(files)
        project.reuse.pop(".", None)  # site-packages is no project's root
        expression = normalize(expression) if expression else None
        # A License-Expression covers every license file (PEP 639); a short name or classifiers may not.
        if reuse_files and where != "License-Expression":
            licenses = [reuse_ids(path.name, _read(path)) for path in sorted(reuse_files)]
            project.reuse["."] = _reuse_at(files, ".", set(project.reuse) | {"."}, licenses, stated=expression)
            expression, where = project.reuse["."].whole, "REUSE" if where == "none" else f"{where} + REUSE"
        project.license, project.license_source = expression, where
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
    # the phrases of every license it detects). Asked of every file of every project: string work, no PurePath.
    name = rel.rpartition("/")[2]
    return name.lower().startswith(LICENSE_NAMES) and language_of(name) in (None, "markdown", "restructuredtext")


def _is_notice(rel: str) -> bool:
    return rel.rpartition("/")[2].lower().startswith("notice") and _is_license_file(rel)


def _folder_licenses(project: Project) -> dict[str, str]:
    """Folders below the project root holding a license file that names a license: a permissive repository that
    vendors a GPL library under `libs/gplthing/` (with its COPYING) must not pass that code off under its own license.
    License files that name no known license leave the folder's license as is, and so do NOTICE files: they credit
    single files (`_credits`), not the folder. A REUSE root's license file is its `Reuse.stated`."""
    by_folder: dict[str, list[Path]] = {}
    for path, rel in project.files:
        if not _is_license_file(rel) or _is_notice(rel):
            continue
        folder = PurePosixPath(rel).parent
        if folder.as_posix() != "." and folder.as_posix() not in project.reuse and folder.name != "LICENSES":
            by_folder.setdefault(folder.as_posix(), []).append(path)
    found = {folder: _first_license_text(sorted(paths)) for folder, paths in sorted(by_folder.items())}
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


def _reuse_roots(files: dict[str, Path], stated: str | None = None) -> dict[str, Reuse]:
    """The REUSE projects among a project's files, by root folder ("." the project's, which states `stated` besides):
    a folder whose `LICENSES/` holds a text named by an SPDX id, or with a `.reuse/dep5`, and a REUSE.toml's folder
    when no root is above it (a REUSE.toml below a root is that root's). Other `LICENSES/` folders hold bundled
    licenses (pandas' NUMPY_LICENSE). Below the project's root, a root's license file is what it states."""
    texts: dict[str, list[str]] = {}
    for rel in files:
        if "LICENSES/" in rel and PurePosixPath(rel).parent.name == "LICENSES":
            texts.setdefault(PurePosixPath(rel).parent.parent.as_posix(), []).append(PurePosixPath(rel).name)
    roots = {folder for folder, names in texts.items() if any(spdx_named(name) for name in names)}
    roots |= {PurePosixPath(rel).parent.parent.as_posix() for rel in files if f"/{rel}".endswith("/.reuse/dep5")}
    tomls = (rel for rel in files if rel.endswith("REUSE.toml") and PurePosixPath(rel).name == "REUSE.toml")
    for rel in sorted(tomls, key=lambda r: r.count("/")):
        if _root_of(rel, roots) is None:
            roots.add(PurePosixPath(rel).parent.as_posix())
    found = {}
    for root in sorted(roots):
        own = sorted(path for rel, path in files.items()
                     if PurePosixPath(rel).parent.as_posix() == root and _is_license_file(rel) and not _is_notice(rel))
        found[root] = _reuse_at(files, root, roots, stated=stated if root == "." else _first_license_text(own))
    return found


def _root_of(rel: str, roots: set[str]) -> str | None:
    """The nearest of `roots` above a file."""
    return next((p.as_posix() for p in PurePosixPath(rel).parents if p.as_posix() in roots), None)


def _reuse_at(files: dict[str, Path], root: str, roots: set[str], licenses: list[list[str]] | None = None,
              stated: str | None = None) -> Reuse:
    """The REUSE licensing of the files below `root` that no deeper root takes: its `LICENSES/` texts (`licenses`
    when given: a distribution keeps them in its .dist-info), its REUSE.toml files, .reuse/dep5 and `.license`
    companions, and what it states besides."""
    prefix = "" if root == "." else f"{root}/"
    if licenses is None:
        licenses = [reuse_ids(PurePosixPath(rel).name, _read(path)) for rel, path in sorted(files.items())
                    if PurePosixPath(rel).parent.as_posix() == f"{prefix}LICENSES" and not rel.endswith(".license")]
    mine = sorted(rel for rel in files if _root_of(rel, roots) == root)
    tomls = {PurePosixPath(rel[len(prefix) :]).parent.as_posix(): reuse_toml(_read(files[rel]))
             for rel in mine if PurePosixPath(rel).name == "REUSE.toml"}
    dep5 = reuse_dep5(_read(files[f"{prefix}.reuse/dep5"])) if f"{prefix}.reuse/dep5" in files else []
    companions = {}
    for rel in mine:
        if rel.endswith(".license") and rel.removesuffix(".license") in files:
            tags = spdx_header(_read(files[rel]))
            companions[rel[len(prefix) :].removesuffix(".license")] = normalize(tags) if tags else None
    return Reuse(licenses=licenses, tomls=tomls, dep5=dep5, companions=companions, stated=stated)


def _license_from_files(root: Path, files: dict[str, Path]) -> tuple[str | None, str]:
    top = sorted(path for rel, path in files.items() if "/" not in rel and _is_license_file(rel))
    found = _first_license_text(top)
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
