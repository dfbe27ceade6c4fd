"""`mellum train pretrain`: pre-train a model from a recipe (FIM shards, Muon + AdamW, WSD, exact resume, export).

Several processes: `torchrun --nproc-per-node N -m mellum.train.pretrain ...` takes the same arguments.
"""

from __future__ import annotations

HELP = "pre-train a model (FIM, MoE losses, MTP) from a recipe"


def configure(parser) -> None:
    from mellum.train.pretrain import configure as configure_pretrain

    parser.epilog = ("recipes: mellum-4b, mellum2 (published), mellum-tiny (reference model, GPU), mellum-tiny-cpu, "
                     "mellum-tiny-long (YaRN long-context stage), mellum-tiny-mtp (an MTP head for the bundled model), "
                     "tiny-cpu, tiny-moe-cpu, tiny-long-cpu")
    configure_pretrain(parser)


def run(args) -> int:
    import sys

    from mellum.train.pretrain import config_from_args, run as run_pretrain

    if not args.no_export and not config_from_args(args).tokenizer:
        # Said before training, not after: `complete`, `serve` and `eval` cannot load a model without its tokenizer.
        print("mellum: note: no tokenizer (--tokenizer DIR, the one the shards were made with): the exported model "
              "will have no tokenizer.json, which `mellum complete`, `serve` and `eval` need", file=sys.stderr)
    return run_pretrain(args)
