"""The `mellum` command: a table of subcommands, each a thin module under `mellum/commands/`.

Every command module exposes `configure(parser)` adding its arguments and `run(args) -> int` calling plain,
importable library functions; the one-line help of each command is in `COMMAND_HELP` here. Modules are imported
only when their command runs, so `mellum --help` stays fast and optional extras are needed only by the commands
that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys

# "group sub" paths → module under mellum.commands. Groups get a parser of their own.
COMMANDS: dict[str, str] = {
    "info": "info",
    "complete": "complete",
    "demo": "demo",
    "serve": "serve",
    "lsp": "lsp",
    "data build": "data_build",
    "data preferences": "data_preferences",
    "data shards": "data_shards",
    "tokenizer train": "tokenizer_train",
    "train pretrain": "train_pretrain",
    "train sft": "train_sft",
    "train dpo": "train_dpo",
    "train grpo": "train_grpo",
    "eval": "eval",
    "export gguf": "export_gguf",
}

GROUP_HELP = {
    "data": "build training corpora and export preference pairs",
    "tokenizer": "train a byte-level BPE tokenizer with the Mellum special tokens",
    "train": "pre-training and post-training stages",
    "export": "write a model in another engine's format",
}

# One-line help per command, kept here so `mellum --help` imports no command module.
COMMAND_HELP = {
    "info": "print a model's architecture and total/active parameter counts (no weights allocated)",
    "complete": "complete code at a file position with a model",
    "demo": "complete code in the bundled sample project with the bundled model",
    "serve": "HTTP completion server (OpenAI-compatible and native FIM endpoints)",
    "lsp": "language server with inline completion (stdio or TCP)",
    "data build": "walk sources, keep permissively licensed code, filter, redact secrets, deduplicate",
    "data preferences": "export DPO preference pairs from the telemetry database",
    "data shards": "tokenize a corpus into binary shards with FIM and repository-level samples",
    "tokenizer train": "train a BPE tokenizer on a corpus",
    "train pretrain": "pre-train a model (FIM, MoE losses, MTP) from a recipe",
    "train sft": "supervised fine-tuning (project-context FIM, chat)",
    "train dpo": "direct preference optimisation from preference pairs",
    "train grpo": "reinforcement learning with verifiable rewards (GRPO)",
    "eval": "benchmarks: FIM, repository-level, generation, latency",
    "export gguf": "write a Llama-architecture model as a GGUF file for llama.cpp (f32, f16, bf16, q8_0)",
}


def _load(module: str):
    return importlib.import_module(f"mellum.commands.{module}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mellum",
        description="Mellum code completion: models, project context, inference, serving and training.",
    )
    from mellum import __version__

    parser.add_argument("--version", action="version", version=f"mellum {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module in COMMANDS.items():
        words = path.split()
        if len(words) == 1:
            sub = top.add_parser(words[0], help=COMMAND_HELP[path], description=COMMAND_HELP[path])
        else:
            group, name = words
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            sub = groups[group].add_parser(name, help=COMMAND_HELP[path], description=COMMAND_HELP[path])
        sub.set_defaults(_module=module, _configured=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass finds the command; its module then adds its own arguments and we parse again.
    known, _ = _parse_known(parser, argv)
    module_name = getattr(known, "_module", None)
    if module_name is None:
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        # A group without its subcommand (`mellum data --help`, `mellum train`) or an unknown command: argparse
        # prints the group's help (exit 0) or says what is missing or wrong (exit 2).
        parser.parse_args(argv)
        parser.print_help()
        return 2
    module = _load(module_name)
    parser = build_parser()
    _configure(parser, module_name, module)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FileNotFoundError, ValueError, NotADirectoryError, FileExistsError, PermissionError,
            ConnectionError) as exc:
        # Library code raises these with messages written for users; no traceback for bad input.
        print(f"mellum: error: {exc}", file=sys.stderr)
        return 2


def _parse_known(parser: argparse.ArgumentParser, argv: list[str]):
    # Parse without letting -h exit before the command's own arguments exist; argparse's complaints (a group
    # without its subcommand) wait for the full parse, which says them once.
    stripped = [a for a in argv if a not in ("-h", "--help", "--version")]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_known_args(stripped)
    except SystemExit:
        return argparse.Namespace(), []


def _configure(parser: argparse.ArgumentParser, module_name: str, module) -> None:
    for action in parser._subparsers._group_actions:  # the top-level subcommand action
        for sub in action.choices.values():
            _configure_sub(sub, module_name, module)


def _configure_sub(parser: argparse.ArgumentParser, module_name: str, module) -> None:
    if parser.get_default("_module") == module_name:
        module.configure(parser)
        return
    if parser._subparsers is not None:
        for action in parser._subparsers._group_actions:
            for sub in action.choices.values():
                _configure_sub(sub, module_name, module)


if __name__ == "__main__":
    sys.exit(main())
