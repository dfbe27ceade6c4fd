"""`mellum tokenizer train`: a byte-level BPE with the Mellum special tokens, trained on a corpus, with a
compression report (bytes per token on held-out files) and a byte-exact round-trip check."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HELP = "train a BPE tokenizer on a corpus"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a byte-level BPE (Hugging Face tokenizers) on a corpus from `mellum data build`, with the Mellum "
        "special tokens (<|endoftext|> = 0, FIM, <filename>, <reponame>, chat, think). A deterministic share of "
        "files is held out to measure compression (bytes per token); every held-out file and every file of one "
        "project are checked to round-trip byte-exactly. Writes tokenizer.json, tokenizer_config.json, "
        "special_tokens_map.json and compression.json to OUT."
    )
    parser.add_argument("--corpus", required=True, help="corpus directory (mellum data build)")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    parser.add_argument("--out", required=True, help="tokenizer directory to create")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--held-out", type=float, default=0.02, help="share of files held out (default 0.02)")
    parser.add_argument("--max-train-mb", type=float, default=100.0,
                        help="train on at most this many MB of text (default 100)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency of a merge (default 2)")
    parser.add_argument("--languages", default=None, help="comma-separated languages to train on (default: all)")
    parser.add_argument("--roundtrip-project", default=None,
                        help="project whose every file must round-trip (default: the corpus's first project)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from mellum.data.corpus import read_corpus
    from mellum.data.outputs import check_output_dir, refuse_inside, replace_dir
    from mellum.tokenizer import compression_report, train_bpe

    out = Path(args.out)
    refuse_inside(out, args.corpus, "corpus")
    check_output_dir(out, args.force, "tokenizer.json")
    if not 0.0 <= args.held_out < 1.0:
        raise ValueError(f"--held-out must be in [0, 1), got {args.held_out}")
    languages = {name.strip() for name in args.languages.split(",")} if args.languages else None
    budget = int(args.max_train_mb * 1e6)
    first = next(iter(read_corpus(args.corpus)), None)
    if first is None:
        raise ValueError(f"corpus {args.corpus} has no files to train on")
    roundtrip_project = args.roundtrip_project or first["project"]
    if args.roundtrip_project and not any(r["project"] == roundtrip_project for r in read_corpus(args.corpus)):
        raise ValueError(f"--roundtrip-project {roundtrip_project!r} is not a project of {args.corpus}; "
                         "see its report.md for the project names")

    def is_held_out(record: dict) -> bool:
        import xxhash

        key = f"{record['project']}/{record['path']}".encode("utf-8")
        return xxhash.xxh64_intdigest(key, seed=17) % 10_000 < args.held_out * 10_000

    trained_files = 0

    def training_texts():
        nonlocal trained_files
        used = 0
        for record in read_corpus(args.corpus):
            if languages and record["language"] not in languages or is_held_out(record):
                continue
            if used >= budget:
                return
            used += len(record["text"])
            trained_files += 1
            yield record["text"]

    # The tokenizers library draws its progress on stdout: only on a terminal, or it leaves blank lines before the
    # summary line in a file or pipe.
    tokenizer = train_bpe(training_texts(), args.vocab_size, min_frequency=args.min_frequency,
                          show_progress=not args.quiet and sys.stdout.isatty())
    if trained_files == 0:
        raise ValueError(f"no file of {args.corpus} is left to train on after --languages, --held-out and "
                         "--max-train-mb; nothing written")
    held_out = compression_report(tokenizer, ((r["language"], r["text"]) for r in read_corpus(args.corpus) if is_held_out(r)))
    project = compression_report(tokenizer, ((r["language"], r["text"]) for r in read_corpus(args.corpus)
                                             if r["project"] == roundtrip_project))
    report = {"vocab_size": tokenizer.vocab_size, "held_out": held_out,
              "roundtrip_project": {"name": roundtrip_project, **project}}
    if held_out["roundtrip_failures"] or project["roundtrip_failures"]:
        raise ValueError(f"the tokenizer does not round-trip every file byte-exactly: {held_out['roundtrip_failures']} "
                         f"held-out and {project['roundtrip_failures']} {roundtrip_project} files differ; nothing written")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save(tmp)
        (tmp / "compression.json").write_text(json.dumps(report, indent=2) + "\n")
        replace_dir(tmp, out)  # the earlier tokenizer is deleted only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus offered merges for only {tokenizer.vocab_size} of {args.vocab_size} tokens "
              f"(too little text, or --min-frequency {args.min_frequency} too high)", file=sys.stderr)
    python = held_out["by_language"].get("python", {})
    print(f"{out}: vocab {tokenizer.vocab_size}; held-out {held_out['files']} files, "
          f"{held_out['bytes_per_token']} bytes/token overall, {python.get('bytes_per_token')} on Python; "
          f"round-trip failures: {held_out['roundtrip_failures']} held-out, "
          f"{project['roundtrip_failures']} of {project['files']} files in {roundtrip_project}")
    return 0
