"""`mellum data shards`: tokenize a corpus into binary shards with FIM and repository-level samples."""

from __future__ import annotations

import argparse
import sys

HELP = "tokenize a corpus into binary shards with FIM and repository-level samples"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Tokenize a corpus (from `mellum data build`) into uint16/uint32 memmap shards with a document index, "
        "read by mellum.data.shards.PackedLoader. Each file becomes one document ending with EOS: plain, FIM "
        "(character-level split; SPM or PSM in the Mellum prompt format), or a repository-level sample "
        "(other files of its project as <filename> blocks, nearest last). --kind sft writes SFT samples whose "
        "middle is a syntactic unit (tree-sitter) with a loss mask on the middle only."
    )
    parser.add_argument("--corpus", required=True, help="corpus directory (mellum data build)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    parser.add_argument("--out", required=True, help="shard directory to create")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--kind", choices=("pretrain", "sft"), default="pretrain", help="sample kind (default pretrain)")
    parser.add_argument("--fim-rate", type=float, default=0.5,
                        help="share of documents turned into FIM samples (default 0.5)")
    parser.add_argument("--spm-rate", type=float, default=1.0,
                        help="share of FIM samples in SPM order, the rest PSM (default 1.0)")
    parser.add_argument("--repo-samples", "--repo-rate", dest="repo_rate", type=float, default=0.0,
                        help="share of documents rendered as repository-level samples (default 0)")
    parser.add_argument("--repo-context-chars", type=int, default=16_000,
                        help="context budget of a repository sample in characters (default 16000)")
    parser.add_argument("--format", default="mellum", help="SPM prompt format (mellum.prompt.FORMATS; default mellum)")
    parser.add_argument("--psm-format", default="mellum-psm", help="PSM prompt format (default mellum-psm)")
    parser.add_argument("--source", action="append", default=None, help="only records of this source label (repeatable)")
    parser.add_argument("--languages", default=None, help="comma-separated languages to include (default: all)")
    parser.add_argument("--mixture", default=None, help="a mixture preset (mellum.data.mixture.MIXTURES: local, mellum2)")
    parser.add_argument("--phase", default=None,
                        help="with --mixture: the phase (number from 1, or name) whose source quotas and FIM rate to "
                             "write; sources are repeated up to the mixture's max_repeat")
    parser.add_argument("--seed", type=int, default=0, help="seed of the FIM splits and sample choices (default 0)")
    parser.add_argument("--verify", action="store_true", help="decode every sample and check it round-trips")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from mellum.data.dataset import DatasetConfig, build_shards
    from mellum.data.samples import SampleConfig
    from mellum.tokenizer import Tokenizer

    for name in ("fim_rate", "spm_rate", "repo_rate"):  # said in the flags' names, before the tokenizer loads
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    samples = SampleConfig(fim_rate=args.fim_rate, spm_rate=args.spm_rate, repo_rate=args.repo_rate,
                           repo_context_chars=args.repo_context_chars, spm_format=args.format, psm_format=args.psm_format)
    quotas, max_repeat, fim_sources = None, 1.0, None
    if args.mixture:
        from mellum.data.dataset import count_tokens
        from mellum.data.mixture import get_mixture

        if args.phase is None:
            raise ValueError("--mixture needs --phase (a number from 1 or a phase name)")
        mixture = get_mixture(args.mixture)
        phase = mixture.phase(args.phase)
        quotas = mixture.plan(count_tokens(args.corpus, tokenizer))[mixture.phases.index(phase)]
        max_repeat, fim_sources = mixture.max_repeat, mixture.code_sources
        samples = dataclasses.replace(samples, fim_rate=phase.fim_rate)
    elif args.phase is not None:
        raise ValueError("--phase needs --mixture")
    config = DatasetConfig(
        kind=args.kind, samples=samples, seed=args.seed,
        sources=frozenset(args.source) if args.source else None,
        languages=frozenset(l.strip() for l in args.languages.split(",")) if args.languages else None,
        fim_sources=fim_sources, verify=args.verify,
    )
    stats = build_shards(args.corpus, tokenizer, args.out, config, force=args.force, progress=not args.quiet,
                         tokenizer_name=_where(args.tokenizer), quotas=quotas, max_repeat=max_repeat)
    kinds = ", ".join(f"{k} {v}" for k, v in stats["by_kind"].items())
    print(f"{args.out}: {stats['documents']} documents ({kinds}), {stats['tokens']:,} tokens, "
          f"{stats['tokens_per_s']:,.0f} tokens/s" + (f"; {stats['verified']} verified" if args.verify else ""))
    for source, missing in (stats.get("short_sources") or {}).items():
        print(f"warning: source {source!r} ran out {missing:,} tokens short of its quota", file=sys.stderr)
    return 0


def _where(tokenizer: str) -> str:
    """The tokenizer as meta.json records it: a directory as an absolute path, as the corpus is; a hub id as given."""
    from pathlib import Path

    return str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else str(tokenizer)
