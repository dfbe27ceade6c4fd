"""`mellum train dpo`: direct preference optimisation from (prompt, chosen, rejected) pairs.

Pairs come from a JSONL file — typically the serving telemetry's export (`mellum data preferences`), whose
`prompt` is the exact prompt the model saw. The reference model is the starting model (or `--reference DIR`), kept
frozen; its log-probs are computed once before training unless `--reference-on-the-fly`.
"""

from __future__ import annotations

import argparse
import sys

HELP = "direct preference optimisation from preference pairs"


def configure(parser: argparse.ArgumentParser) -> None:
    from mellum.commands.train_sft import add_common_arguments

    parser.epilog = ("example: mellum data preferences --telemetry telemetry.db --out pairs.jsonl && "
                     "mellum train dpo --model runs/sft/model --pairs pairs.jsonl --out runs/dpo")
    parser.add_argument("--pairs", required=True, action="append", metavar="FILE",
                        help='preference pairs as JSONL {"prompt", "chosen", "rejected"} (repeatable)')
    parser.add_argument("--heldout-pairs", metavar="FILE", help="held-out pairs (default: --heldout-fraction of --pairs)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="share of pairs held out (default 0.1)")
    parser.add_argument("--beta", type=float, default=0.1,
                        help="DPO beta: strength of the anchor to the reference (default 0.1)")
    parser.add_argument("--reference", help="reference model: a directory or hub id (default: the starting model)")
    parser.add_argument("--reference-on-the-fly", action="store_true",
                        help="keep the reference in memory and score each batch, instead of precomputing log-probs")
    add_common_arguments(parser, steps=100, lr=5e-5, batch=16)


def run(args) -> int:
    from mellum.checkpoint import model_directory
    from mellum.commands.train_sft import finetune_config, finish, load_model_and_tokenizer, prepare_out
    from mellum.train.dpo import DPOConfig, read_pairs, train_dpo
    from mellum.train.sft import split_by_path

    pairs = [p for path in args.pairs for p in read_pairs(path)]
    if args.heldout_pairs:
        train, heldout = pairs, read_pairs(args.heldout_pairs)
    else:
        keep, held = split_by_path([str(i) for i in range(len(pairs))], args.heldout_fraction, args.seed)
        train = [p for i, p in enumerate(pairs) if str(i) in keep]
        heldout = [p for i, p in enumerate(pairs) if str(i) in held]
    reference_dir = model_directory(args.reference) if args.reference else None  # before the run directory is made
    inputs = {"reference model": reference_dir, **{f"--pairs {path}": path for path in args.pairs}}
    out = prepare_out(args, inputs)
    config = finetune_config(args)
    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    reference = load_model_and_tokenizer(reference_dir)[0] if reference_dir else None
    print(f"dpo: {len(train)} training pairs, {len(heldout)} held out", file=sys.stderr)
    summary = train_dpo(model, tokenizer, train, heldout, config,
                        DPOConfig(beta=args.beta, precompute_reference=not args.reference_on_the_fly),
                        reference=reference, out_dir=out, bar=not args.no_bar, resume=args.resume)
    return finish(args, out, model, tokenizer, summary, "dpo")
