"""`mellum export gguf`: write a Llama-architecture model directory as one GGUF file for llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path


def configure(parser) -> None:
    from mellum.gguf import TYPES

    parser.description = (
        "Write a model directory (config.json, safetensors, tokenizer.json) as one GGUF file that llama.cpp loads "
        "(llama-server -m FILE, llama-cpp-python). Llama-architecture models only (Mellum-4B family, the bundled "
        "model); an MTP head is left out. Serve the file with llama.cpp's llama-server and reach it through the "
        "OpenAI-compatible backend (mellum.engine.OpenAIEngine), or compare engines with benchmarks/engine.py."
    )
    parser.add_argument("model", metavar="MODEL", help="model directory or hub id")
    parser.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (it appears only once complete)")
    parser.add_argument("--force", action="store_true", help="replace OUT.gguf if it exists")
    parser.add_argument("--type", dest="kind", choices=TYPES, default="f32",
                        help="weight type: f32 (default, exact), f16, bf16, or q8_0 (8-bit blocks of 32 with one "
                             "scale each); norms stay f32")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args) -> int:
    from mellum.gguf import export_gguf

    if Path(args.out).is_file() and not args.force:
        raise FileExistsError(f"{args.out} already exists; pass --force to replace it")
    summary = export_gguf(args.model, args.out, args.kind, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['path']}: {summary['tensors']} tensors, {summary['type']}, "
              f"{summary['bytes'] / 1e6:.1f} MB, pre-tokenizer {summary['pre_tokenizer']}"
              + (f"; left out {len(summary['skipped'])} tensors ({summary['skipped'][0]}, ...)"
                 if summary["skipped"] else ""))
    return 0
