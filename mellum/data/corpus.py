"""The training corpus: built from sources (license governance → filters → secret redaction → dedup) into a
directory of compressed JSONL records with a report, and read back.

Layout (docs/data.md), written under a temporary name and renamed when complete:

    files.jsonl.zst   one JSON object per kept file: {"project", "path", "language", "license", "source", "text"}
    report.json       counts: projects kept/excluded (with license and reason), files skipped by reason,
                      duplicates removed, secrets redacted by kind, languages, throughput
    report.md         the same, readable
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mellum.data.dedup import DedupConfig, Deduplicator, MinHasher, exact_key
from mellum.data.filters import FilterConfig, content_reason, language_of, path_reason
from mellum.data.license import PERMISSIVE, LicensePolicy, conjoin, normalize, spdx_header
from mellum.data.notices import notice_header
from mellum.data.outputs import check_output_dir, refuse_inside, replace_dir
from mellum.data.secrets import SecretRedactor, SecretsConfig
from mellum.data.sources import Project, discover

FILES = "files.jsonl.zst"


@dataclass
class BuildConfig:
    """Everything that decides what enters the corpus."""

    allow: frozenset[str] = field(default_factory=lambda: PERMISSIVE)
    filters: FilterConfig = field(default_factory=FilterConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    chunk_files: int = 16  # files per task sent to a worker
    zstd_level: int = 3


# ---- per-file work (runs in worker processes) -----------------------------------------------------------

_WORKER: dict = {}


def _init_worker(config: BuildConfig) -> None:
    _WORKER["config"] = config
    _WORKER["redactor"] = SecretRedactor(config.secrets)
    _WORKER["hasher"] = MinHasher(config.dedup) if config.dedup.near else None


def _process(task: tuple[str, str]) -> dict:
    """Read, filter, redact and fingerprint one file. Returns a dict with either `text` or `skip`."""
    path, rel = task
    config: BuildConfig = _WORKER["config"]
    result: dict = {"rel": rel, "bytes": 0}
    reason = path_reason(rel, config.filters)
    if reason:
        result["skip"] = reason
        return result
    try:
        with open(path, "rb") as f:
            data = f.read(config.filters.max_bytes + 1)
    except OSError as exc:
        result["skip"] = f"unreadable: {exc.strerror or exc}"
        return result
    result["bytes"] = len(data)
    text, reason = content_reason(data, config.filters)
    if text is None:
        result["skip"] = reason
        return result
    result["spdx"] = spdx_header(text)
    result["notice"] = notice_header(text) if result["spdx"] is None else None
    text, found = _WORKER["redactor"].redact(text)
    result["secrets"] = dict(found)
    result["text"] = text
    result["language"] = language_of(rel)
    result["hash"] = exact_key(text) if config.dedup.exact else None
    result["signature"] = _WORKER["hasher"].signature(text) if _WORKER["hasher"] is not None else None
    return result


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _process_chunk(tasks: list[tuple[str, str]]) -> list[dict]:
    return [_process(t) for t in tasks]


# ---- the build --------------------------------------------------------------------------------------------


def parse_source(spec: str) -> tuple[str, str]:
    """`LABEL=PATH` or `PATH` (label "code") → (label, path)."""
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        if label.isidentifier():
            return label, path
    return "code", spec


def build_corpus(
    sources: Iterable[str],
    out: str | os.PathLike,
    config: BuildConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build a corpus directory from source paths (each `PATH` or `LABEL=PATH`); returns the report dict."""
    import zstandard
    from tqdm import tqdm

    config = config or BuildConfig()
    out = Path(out)
    if not force:
        check_output_dir(out, force, "report.json")  # an existing --out is refused before a long discovery
    sources = list(sources)
    if not sources:
        raise ValueError("no sources given: pass --source DIR (a project, git repository, stdlib or site-packages)")
    started = time.perf_counter()
    projects: list[Project] = []
    for spec in sources:
        label, path = parse_source(spec)
        projects.extend(discover(path, label))  # checks the path first: missing, a file, a symlink loop
        refuse_inside(out, path, "source")  # --force would delete it once the corpus is written
    check_output_dir(out, force, "report.json")  # with --force: only an earlier corpus (after the source checks)
    _unique_names(projects)

    policy = LicensePolicy(frozenset(config.allow))
    report = _Report(config, sources)
    tasks: list[tuple[str, str]] = []
    owners: list[Project] = []
    for project in projects:
        entry = report.add_project(project, _admitted(project, policy))
        for rel, reason in project.skipped:
            report.skip(entry, reason)
        if not entry["kept"]:
            report.excluded_files += len(project.files)
            continue
        for path, rel in project.files:
            tasks.append((str(path), rel))
            owners.append(project)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        dedup = Deduplicator(config.dedup)
        compressor = zstandard.ZstdCompressor(level=config.zstd_level)
        with open(tmp / FILES, "wb") as raw, compressor.stream_writer(raw) as writer:
            bar = tqdm(total=len(tasks), unit="file", desc="data build", disable=not progress, smoothing=0.1)
            for i, result in enumerate(_results(tasks, config)):
                project = owners[i]
                entry = report.projects[project.name]
                report.bytes_read += result["bytes"]
                bar.update(1)
                if i % 256 == 0:
                    bar.set_postfix_str(f"{report.bytes_read / 1e6 / max(1e-9, time.perf_counter() - started):.1f} MB/s")
                if "skip" in result:
                    report.skip(entry, result["skip"])
                    continue
                file_license = _file_license(project, result, policy)
                if not policy.allows(file_license):  # a REUSE project's license need not be allowed: its files'
                    report.skip(entry, f"file license {file_license or 'unknown'}")
                    continue
                key = f"{project.name}/{result['rel']}"
                dup = dedup.check(key, result["hash"], result["signature"])
                if dup is not None:
                    report.duplicate(entry, dup[0], key, dup[1])
                    continue
                report.keep(entry, result, file_license)
                record = {
                    "project": project.name,
                    "path": result["rel"],
                    "language": result["language"],
                    "license": file_license,
                    "source": project.source,
                    "text": result["text"],
                }
                writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
            bar.close()
        report.elapsed = time.perf_counter() - started
        data = report.as_dict()
        (tmp / "report.json").write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(data))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data


def _admitted(project: Project, policy: LicensePolicy) -> bool:
    """Whether a project's files are read: its license is allowed or, for a REUSE project (licensed file by file),
    one of the licenses a file of it can get is."""
    reuse = project.reuse.get(".")
    return policy.allows(project.license) or (reuse is not None and any(map(policy.allows, reuse.possible())))


def _file_license(project: Project, result: dict, policy: LicensePolicy) -> str | None:
    """A file's license, from the SPDX tags of its head (`Project.license_of`: with a NOTICE's credit of the file,
    folder license files and REUSE's rules). Tags that are not allowed keep the file out even where REUSE ignores
    them (an `override` table, a `.license` companion): the file says so itself. Without tags, a license notice in
    its head names it (setuptools' vendored MPL-2.0 files in an MIT project), but never lets in a file that its
    folder's or project's license keeps out ("ported from X, licensed under the Apache License" in a GPL folder)."""
    tags = normalize(result["spdx"]) if result["spdx"] else None
    found = project.license_of(result["rel"], tags)
    if tags and not policy.allows(tags):
        return conjoin([found, tags])
    notice = result.get("notice")
    if not tags and notice and (not policy.allows(notice) or policy.allows(found)):
        return notice
    return found


def _results(tasks: list[tuple[str, str]], config: BuildConfig) -> Iterator[dict]:
    """Results in task order (deterministic dedup), from a worker pool when more than one worker is asked."""
    if config.workers <= 1 or len(tasks) < 64:
        _init_worker(config)
        for t in tasks:
            yield _process(t)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        for chunk in pool.imap(_process_chunk, _chunks(tasks, config.chunk_files)):
            yield from chunk


def _unique_names(projects: list[Project]) -> None:
    """Two sources may hold the same distribution (venv and system site-packages): suffix repeats with #2, #3."""
    seen: Counter = Counter()
    for p in projects:
        seen[p.name] += 1
        if seen[p.name] > 1:
            p.name = f"{p.name}#{seen[p.name]}"


class _Report:
    def __init__(self, config: BuildConfig, sources: list[str]):
        self.config = config
        self.sources = sources
        self.projects: dict[str, dict] = {}
        self.skipped: Counter = Counter()
        self.secrets: Counter = Counter()
        self.languages: dict[str, Counter] = defaultdict(Counter)
        self.duplicates: Counter = Counter()
        self.duplicate_examples: list[dict] = []
        self.bytes_read = 0
        self.excluded_files = 0
        self.files_with_secrets = 0
        self.elapsed = 0.0

    def add_project(self, project: Project, allowed: bool) -> dict:
        if allowed:
            reason = None
        elif project.license is None:
            reason = "license unknown"
        else:
            reason = f"license not allowed: {project.license}"
        entry = {
            "name": project.name, "kind": project.kind, "source": project.source, "root": str(project.root),
            "license": project.license, "license_source": project.license_source, "kept": allowed, "reason": reason,
            "files": len(project.files), "files_kept": 0, "bytes_kept": 0, "duplicates": 0, "secrets": 0,
            "skipped": Counter(),
        }
        self.projects[project.name] = entry
        return entry

    def skip(self, entry: dict, reason: str) -> None:
        bucket = reason.split(":")[0] if reason.startswith(("unreadable", "file license")) else reason
        self.skipped[bucket] += 1
        entry["skipped"][bucket] += 1

    def duplicate(self, entry: dict, kind: str, key: str, original: str) -> None:
        self.duplicates[kind] += 1
        entry["duplicates"] += 1
        if len(self.duplicate_examples) < 100:
            self.duplicate_examples.append({"kind": kind, "file": key, "original": original})

    def keep(self, entry: dict, result: dict, license: str) -> None:
        n = len(result["text"].encode("utf-8"))
        entry["files_kept"] += 1
        entry["bytes_kept"] += n
        found = sum(result["secrets"].values())
        entry["secrets"] += found
        self.files_with_secrets += found > 0
        self.secrets.update(result["secrets"])
        self.languages[result["language"]]["files"] += 1
        self.languages[result["language"]]["bytes"] += n

    def as_dict(self) -> dict:
        projects = sorted(self.projects.values(), key=lambda e: e["name"].lower())
        kept = [p for p in projects if p["kept"]]
        excluded = [p for p in projects if not p["kept"]]
        kept_by_license: Counter = Counter(p["license"] for p in kept)
        excluded_by_reason: dict[str, list[str]] = defaultdict(list)
        for p in excluded:
            excluded_by_reason[p["reason"]].append(p["name"])
        bytes_kept = sum(p["bytes_kept"] for p in projects)
        return {
            "sources": self.sources,
            "config": _config_dict(self.config),
            "totals": {
                "projects": len(projects),
                "projects_kept": len(kept),
                "projects_excluded": len(excluded),
                "files_seen": sum(p["files"] for p in projects),
                "files_in_excluded_projects": self.excluded_files,
                "files_kept": sum(p["files_kept"] for p in projects),
                "files_skipped": sum(self.skipped.values()),
                "bytes_read": self.bytes_read,
                "bytes_kept": bytes_kept,
                "exact_duplicates": self.duplicates["exact duplicate"],
                "near_duplicates": self.duplicates["near duplicate"],
                "secrets_redacted": sum(self.secrets.values()),
                "files_with_secrets": self.files_with_secrets,
                "elapsed_s": round(self.elapsed, 2),
                "mb_per_s": round(self.bytes_read / 1e6 / max(self.elapsed, 1e-9), 2),
            },
            "secrets_by_kind": dict(self.secrets.most_common()),
            "skipped_by_reason": dict(self.skipped.most_common()),
            "kept_by_license": dict(kept_by_license.most_common()),
            "excluded_by_reason": {k: sorted(v) for k, v in sorted(excluded_by_reason.items())},
            "languages": {k: dict(v) for k, v in sorted(self.languages.items(), key=lambda kv: -kv[1]["bytes"])},
            "duplicate_examples": self.duplicate_examples,
            "projects": [{**p, "skipped": dict(p["skipped"])} for p in projects],
        }


def _config_dict(config: BuildConfig) -> dict:
    data = asdict(config)
    data["allow"] = sorted(config.allow)
    data["filters"]["languages"] = sorted(config.filters.languages)
    return data


def render_markdown(report: dict) -> str:
    """A readable summary of a build report."""
    t = report["totals"]
    lines = [
        "# Corpus report",
        "",
        f"Sources: {', '.join(report['sources'])}",
        "",
        f"- Projects: {t['projects']} ({t['projects_kept']} kept, {t['projects_excluded']} excluded)",
        f"- Files: {t['files_seen']} seen, {t['files_kept']} kept, {t['files_skipped']} skipped by filters, "
        f"{t['files_in_excluded_projects']} in excluded projects",
        f"- Duplicates removed: {t['exact_duplicates']} exact, {t['near_duplicates']} near "
        f"(Jaccard ≥ {report['config']['dedup']['threshold']})",
        f"- Secrets redacted: {t['secrets_redacted']} in {t['files_with_secrets']} files "
        + (f"({', '.join(f'{k} {v}' for k, v in report['secrets_by_kind'].items())})" if report["secrets_by_kind"] else ""),
        f"- Bytes: {t['bytes_read'] / 1e6:.1f} MB read, {t['bytes_kept'] / 1e6:.1f} MB kept; "
        f"{t['elapsed_s']} s ({t['mb_per_s']} MB/s)",
        "",
        "## Kept projects by license",
        "",
        "| license | projects |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["kept_by_license"].items()]
    lines += ["", "## Excluded projects", ""]
    for reason, names in report["excluded_by_reason"].items():
        lines.append(f"- **{reason}**: {', '.join(names)}")
    lines += ["", "## Files skipped by reason", "", "| reason | files |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["skipped_by_reason"].items()]
    lines += ["", "## Languages", "", "| language | files | MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['files']} | {v['bytes'] / 1e6:.2f} |" for k, v in report["languages"].items()]
    lines += ["", "## Projects", "", "| project | kind | license | from | kept | files kept | dups | secrets |", "|---|---|---|---|---|---|---|---|"]
    for p in report["projects"]:
        lines.append(
            f"| {p['name']} | {p['kind']} | {p['license'] or 'unknown'} | {p['license_source']} | "
            f"{'yes' if p['kept'] else 'no'} | {p['files_kept']} | {p['duplicates']} | {p['secrets']} |"
        )
    return "\n".join(lines) + "\n"


# ---- reading ------------------------------------------------------------------------------------------------


def read_corpus(corpus: str | os.PathLike) -> Iterator[dict]:
    """Records of a corpus directory in the order they were written."""
    import zstandard

    path = Path(corpus)
    file = path / FILES
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a corpus directory (no {FILES}); build one with `mellum data build`")
    with open(file, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        import io

        number = 0
        try:
            for number, line in enumerate(io.TextIOWrapper(reader, encoding="utf-8"), 1):
                if line.strip():
                    yield json.loads(line)
        except (ValueError, zstandard.ZstdError) as exc:  # JSON, UTF-8 or zstd: a damaged or cut-short file
            raise ValueError(f"{file} cannot be read near record {max(number, 1)} ({exc}): the corpus is damaged; "
                             "build it again with `mellum data build`") from None


def read_report(corpus: str | os.PathLike) -> dict:
    path = Path(corpus) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{corpus} has no report.json: not a complete corpus directory")
    return json.loads(path.read_text())
