"""`mellum train sft`: supervised fine-tuning on project-context FIM samples and/or chat conversations.

FIM samples come from project directories (`--source`, one project each): every supported file gives up to
`--samples-per-file` samples whose middle is a syntactic unit, with other files of the project as context; the loss
is on the middle only. Chat data (`--chat FILE.jsonl`, lines {"messages": [...]}) is masked for Instruct (every
assistant turn) or Thinking (the final turn with its reasoning; conversations unfolded). Also holds the arguments
shared by the post-training commands (dpo, grpo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "supervised fine-tuning (project-context FIM, chat)"
# A base model's record of how it was made, carried into every model fine-tuned from it.
LINEAGE_FILES = ("training_config.json", "training_log.jsonl", "data_report.md")


# ---- arguments shared by sft, dpo and grpo ----------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    parser.add_argument("--model", required=True, help="model to start from: a directory (weights + tokenizer) or a "
                        "hub id like owner/name (downloaded, or taken from the hub cache)")
    parser.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints, summary.json, model/")
    parser.add_argument("--export", help="where to write the fine-tuned model (default OUT/model); an earlier "
                        "model there is replaced, anything else (or the base model) is refused")
    parser.add_argument("--max-steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch, help=f"examples per step (default {batch})")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per forward/backward (default 4)")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per example (default 1024)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--decay-fraction", type=float, default=0.2,
                        help="share of the run decaying the LR linearly to zero (default 0.2)")
    parser.add_argument("--muon", action="store_true", help="Muon for hidden matrices (as in pre-training); "
                        "default AdamW everywhere")
    parser.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps (0: ends only)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-bar", action="store_true", help="no progress bar")


def finetune_config(args):
    import torch

    from mellum.train.optim import OptimConfig
    from mellum.train.schedule import WSDSchedule
    from mellum.train.sft import FinetuneConfig

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return FinetuneConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, micro_batch=min(args.micro_batch, args.batch_size),
        max_len=args.max_len, optim=OptimConfig(lr=args.lr, weight_decay=0.0, muon=args.muon),
        schedule=WSDSchedule(warmup_steps=args.warmup_steps, decay_fraction=args.decay_fraction), seed=args.seed,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, device=device)


def prepare_out(args, inputs: dict[str, object] | None = None) -> Path:
    """The run directory, checked before anything loads; also sets `args.model_dir`, the local directory of
    `--model` (a hub id's snapshot). The export may replace neither the base model nor the run's other `inputs`
    (what each is called → its path)."""
    from mellum.checkpoint import check_export_dir, model_directory
    from mellum.train import checkpointing

    out = Path(args.out)
    if not args.resume and (checkpointing.latest_checkpoint(out) is not None or (out / "summary.json").exists()):
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue, or choose another --out")
    args.model_dir = model_directory(args.model)
    check_export_dir(export_dir(args, out), {"base model": args.model_dir, **(inputs or {})})  # before training
    return out  # made by the training loop once the model and data have loaded: a failed start leaves nothing


def export_dir(args, out: Path) -> Path:
    return Path(args.export) if args.export else out / "model"


def load_model_and_tokenizer(path):
    """fp32 model and tokenizer of a model directory or hub id."""
    from mellum import load_pretrained
    from mellum.checkpoint import model_directory
    from mellum.tokenizer import Tokenizer

    path = model_directory(path)
    return load_pretrained(path, dtype=__import__("torch").float32), Tokenizer.from_pretrained(path)


def finish(args, out: Path, model, tokenizer, summary: dict, stage: str) -> int:
    from mellum.train.sft import export_model

    export = export_dir(args, out)
    export_model(model, export, tokenizer, args.export_dtype, lineage(args.model_dir, out, stage, args))
    summary = {"stage": stage, **summary, "model": str(export)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    print(json.dumps(summary))
    return 0


def lineage(base: Path, out: Path, stage: str, args) -> dict[str, str]:
    """What the exported model says about how it was made: the base model's own record (its pre-training config and
    log, data report, earlier stages' logs and arguments), then this stage's log (`<stage>_log.jsonl`) and command
    line (`<stage>_args.json`). A later stage of the same name replaces that stage's files."""
    files = {}
    for path in sorted(base.iterdir()):
        if path.name in LINEAGE_FILES or path.name.endswith(("_log.jsonl", "_args.json")):
            files[path.name] = path.read_text(encoding="utf-8")
    if (out / "metrics.jsonl").is_file():
        files[f"{stage}_log.jsonl"] = (out / "metrics.jsonl").read_text(encoding="utf-8")
    arguments = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    files[f"{stage}_args.json"] = json.dumps(arguments, indent=2, default=str) + "\n"
    return files


# ---- sft -----------------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example: mellum train sft --model runs/mellum-tiny/model --source ~/src/myproject "
                     "--out runs/sft --max-steps 200")
    parser.add_argument("--source", action="append", default=[], metavar="DIR",
                        help="a project directory of source files (repeatable); FIM samples with project context")
    parser.add_argument("--corpus", action="append", default=[], metavar="DIR",
                        help="a corpus from `mellum data build` (repeatable): FIM samples per project")
    parser.add_argument("--heldout-corpus", metavar="DIR",
                        help="held-out corpus: its samples give the held-out loss (then nothing else is held out)")
    parser.add_argument("--max-files", type=int, help="sample at most this many files per corpus (seeded)")
    parser.add_argument("--chat", action="append", default=[], metavar="FILE",
                        help='chat conversations as JSONL, one {"messages": [...]} per line (repeatable)')
    parser.add_argument("--masking", default="instruct", choices=["instruct", "thinking"],
                        help="chat loss: every assistant turn (instruct) or the final turn with its reasoning, "
                             "conversations unfolded (thinking)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="share of files (and conversations) kept out of training for the held-out loss "
                             "(default 0.1)")
    parser.add_argument("--samples-per-file", type=int, default=4, help="FIM samples drawn per source file (default 4)")
    parser.add_argument("--max-middle-chars", type=int, default=700,
                        help="longest middle in characters (default 700, as Mellum)")
    parser.add_argument("--context", default="path", choices=["path", "retrieval"],
                        help="project context of FIM samples: the beginnings of the nearest files (path, within "
                             "--context-chars), or what the serving packer retrieves (retrieval: path, imports, "
                             "lexical and definition sources; the whole example within --max-len tokens)")
    parser.add_argument("--context-chars", type=int, default=4000,
                        help="budget of project context per sample with --context path, in characters (default 4000)")
    add_common_arguments(parser, steps=200, lr=1e-4, batch=16)


def run(args) -> int:
    import numpy as np

    from mellum.train.sft import (FimSFTConfig, chat_examples, fim_examples, pick_files, read_chat_file,
                                  read_corpus_projects, read_project, split_by_path, train_sft)

    if not args.source and not args.chat and not args.corpus:
        raise ValueError("nothing to train on: give --source DIR (project code), --corpus DIR and/or --chat FILE.jsonl")
    inputs = {f"--{kind} {path}": path for kind in ("source", "corpus", "chat") for path in getattr(args, kind)}
    if args.heldout_corpus:
        inputs["--heldout-corpus"] = args.heldout_corpus
    out = prepare_out(args, inputs)
    config = finetune_config(args)
    model, tokenizer = load_model_and_tokenizer(args.model_dir)
    fim_config = FimSFTConfig(samples_per_file=args.samples_per_file, max_middle_chars=args.max_middle_chars,
                              context_chars=args.context_chars, context=args.context, prompt_tokens=args.max_len,
                              prompt_format=getattr(model.config, "prompt_format", None) or "mellum")
    rng = np.random.default_rng(args.seed)
    train, heldout = [], []
    n_fim = n_chat = 0
    fraction = 0.0 if args.heldout_corpus else args.heldout_fraction
    projects = []  # (files, paths to sample from or None for all)
    for source in args.source:
        project = read_project(source)
        if not project:
            raise ValueError(f"{source} holds no supported source files (.py, .js, .ts, .java, .kt, .go)")
        projects.append((project, None))
    for corpus in args.corpus:
        by_project = read_corpus_projects(corpus)
        picked = pick_files(by_project, args.max_files, args.seed)
        projects += [(by_project[name], paths) for name, paths in picked.items()]
    for project, paths in projects:
        candidates = [p for p, _ in project if paths is None or p in paths]
        train_paths, held_paths = split_by_path(candidates, fraction, args.seed)
        part_train = fim_examples(project, tokenizer, rng, fim_config, train_paths)
        train += part_train
        heldout += fim_examples(project, tokenizer, rng, fim_config, held_paths)
        n_fim += len(part_train)
    if args.heldout_corpus:
        by_project = read_corpus_projects(args.heldout_corpus)
        for name, paths in pick_files(by_project, args.max_files, args.seed).items():
            heldout += fim_examples(by_project[name], tokenizer, rng, fim_config, paths)
    for chat in args.chat:
        conversations = read_chat_file(chat)
        keep, held = split_by_path([str(i) for i in range(len(conversations))], fraction, args.seed)
        for i, messages in enumerate(conversations):
            examples = chat_examples(messages, tokenizer, args.masking)
            (train if str(i) in keep else heldout).extend(examples)
            n_chat += len(examples) if str(i) in keep else 0
    print(f"sft: {len(train)} training examples ({n_fim} FIM, {n_chat} chat), {len(heldout)} held out",
          file=sys.stderr)
    summary = train_sft(model, tokenizer, train, heldout, config, out, bar=not args.no_bar, resume=args.resume)
    summary.update(fim_examples=n_fim, chat_examples=n_chat)
    return finish(args, out, model, tokenizer, summary, "sft")
