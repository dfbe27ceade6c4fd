"""`mellum data build`: sources → permissively licensed, filtered, redacted, deduplicated corpus directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys

HELP = "walk sources, keep permissively licensed code, filter, redact secrets, deduplicate"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build a training corpus. Each --source is a project directory, a git repository, the Python standard "
        "library, or a site-packages directory (one project per installed distribution). Projects whose license "
        "is unknown or not on the allowlist are excluded; files are filtered (binary, generated, minified, "
        "vendored, oversized, long lines), secrets are redacted, and exact and near duplicates are removed. "
        "Writes OUT/files.jsonl.zst, OUT/report.json and OUT/report.md."
    )
    parser.add_argument("--source", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a source directory; repeatable. LABEL names the source for mixtures (default 'code')")
    parser.add_argument("--out", required=True, help="corpus directory to create")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow", default=None,
                        help="comma-separated SPDX ids to allow (default: the permissive list in mellum.data.license)")
    parser.add_argument("--languages", default=None, help="comma-separated languages to keep (default: code languages)")
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="skip files larger than this (default 1 MB)")
    parser.add_argument("--near-threshold", type=float, default=0.85,
                        help="Jaccard similarity above which files are near duplicates (default 0.85)")
    parser.add_argument("--no-near-dedup", action="store_true", help="exact deduplication only")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: min(2, CPUs))")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mellum.data.corpus import BuildConfig, build_corpus
    from mellum.data.dedup import DedupConfig

    config = BuildConfig()
    if args.allow:
        config.allow = frozenset(a.strip() for a in args.allow.split(",") if a.strip())
    filters = dataclasses.replace(config.filters, max_bytes=args.max_bytes)
    if args.languages:
        filters = dataclasses.replace(filters, languages=frozenset(l.strip() for l in args.languages.split(",")))
    config.filters = filters
    if not 0.0 < args.near_threshold <= 1.0:
        raise ValueError(f"--near-threshold must be in (0, 1], got {args.near_threshold}")
    config.dedup = DedupConfig(threshold=args.near_threshold, near=not args.no_near_dedup)
    if args.workers is not None:
        config.workers = max(1, args.workers)
    report = build_corpus(args.source, args.out, config, force=args.force, progress=not args.quiet)
    t = report["totals"]
    print(
        f"{args.out}: {t['projects_kept']}/{t['projects']} projects kept, {t['files_kept']} files "
        f"({t['bytes_kept'] / 1e6:.1f} MB); excluded {t['projects_excluded']} "
        f"project{'' if t['projects_excluded'] == 1 else 's'}; "
        f"{t['exact_duplicates']} exact + {t['near_duplicates']} near duplicates removed; "
        f"{t['secrets_redacted']} secrets redacted; {t['mb_per_s']} MB/s. See {args.out}/report.md"
    )
    if t["files_kept"] == 0:
        print("warning: no file was kept; see report.md for the reasons", file=sys.stderr)
    return 0
