"""`mellum data preferences`: export DPO pairs (prompt, chosen, rejected) from the telemetry database."""

from __future__ import annotations

import sys
from pathlib import Path


def configure(parser) -> None:
    parser.add_argument("--telemetry", required=True, metavar="DB", help="the server's telemetry SQLite file")
    parser.add_argument("--out", required=True, metavar="FILE", help="JSONL to write (replaced atomically)")
    parser.add_argument("--no-ignored", action="store_true",
                        help="do not count shown-and-ignored suggestions as rejected")
    parser.add_argument("--no-partial", action="store_true", help="do not use partially accepted suggestions")
    parser.add_argument("--max-pairs-per-context", type=int, default=8, metavar="N",
                        help="most (chosen, rejected) pairs taken from one completion context (default 8)")


def run(args) -> int:
    from mellum.serve.telemetry import PreferenceExportConfig, export_preferences

    if args.max_pairs_per_context < 1:
        raise ValueError("--max-pairs-per-context must be at least 1")
    config = PreferenceExportConfig(include_ignored=not args.no_ignored, include_partial=not args.no_partial,
                                    max_pairs_per_context=args.max_pairs_per_context)
    n = export_preferences(args.telemetry, args.out, config)
    print(f"wrote {n} preference pair{'' if n == 1 else 's'} to {Path(args.out)}", file=sys.stderr)
    if n == 0:
        print("no pairs: a pair needs an accepted (or typed) and a rejected/ignored completion for the same "
              "context", file=sys.stderr)
    return 0
