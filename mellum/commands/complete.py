"""`mellum complete`: complete code at a line and column of a file with a model, and print the completion."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def configure(parser) -> None:
    parser.description = (
        "Complete code at a position of a file (1-based line and column, as editors show them) and print the "
        "text to insert there. The model sees the file's text before and after the cursor and, with --project, "
        "context from the rest of the project."
    )
    parser.add_argument("--model", metavar="DIR",
                        help="model directory (config.json, safetensors, tokenizer.json) or hub id owner/name; "
                             "default: $MELLUM_MODEL or the bundled model")
    parser.add_argument("--file", required=True, metavar="F", help="the file to complete in")
    parser.add_argument("--line", required=True, type=int, metavar="L", help="cursor line, 1-based")
    parser.add_argument("--column", required=True, type=int, metavar="C",
                        help="cursor column, 1-based, in characters (line length + 1 = end of the line)")
    parser.add_argument("--project", metavar="DIR", help="project root to take context files from")
    parser.add_argument("--json", action="store_true", help="print the whole result (text, stop reason, token "
                                                            "counts, timings) as one JSON object")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="most tokens to generate (default: the service's, 64)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample from the smallest set of tokens holding P of the probability (default 1: all)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample from the K most likely tokens only (default 0: no limit)")
    parser.add_argument("--seed", type=int, default=None, help="random seed when sampling")
    lines = parser.add_mutually_exclusive_group()
    lines.add_argument("--multiline", dest="multiline", action="store_true", default=None,
                       help="allow a multi-line completion (default: decided from the cursor position)")
    lines.add_argument("--single-line", dest="multiline", action="store_false", help="complete the current line only")
    parser.add_argument("--show-prompt", action="store_true", help="also print the exact prompt (to stderr; "
                                                                   "inside the JSON with --json)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only quantization")
    parser.add_argument("--kv-dtype", choices=["float32", "float16"], default=None,
                        help="KV cache element type on CPU: float32 (default, exact) or float16 (half the bytes "
                             "attention reads per decode step; keys and values rounded)")
    from mellum.commands.serve import add_backend_arguments

    add_backend_arguments(parser)


def split_at(text: str, line: int, column: int) -> tuple[str, str]:
    """(prefix, suffix) of `text` at a 1-based line and column; a clear error for a position outside the file."""
    lines = text.split("\n")
    if not isinstance(line, int) or not 1 <= line <= len(lines):
        raise ValueError(f"--line {line} is outside the file, which has {len(lines)} line(s) (lines start at 1)")
    current = lines[line - 1].rstrip("\r")
    if not isinstance(column, int) or not 1 <= column <= len(current) + 1:
        raise ValueError(f"--column {column} is outside line {line}, which has {len(current)} character(s) "
                         f"(columns start at 1; {len(current) + 1} is the end of the line)")
    offset = sum(len(l) + 1 for l in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def run(args) -> int:
    from mellum.assets import default_model_dir
    from mellum.commands.serve import remote_service
    from mellum.complete import CompletionRequest, CompletionService

    path = Path(args.file)
    if path.is_dir():
        raise ValueError(f"--file {path} is a directory; give the file to complete in")
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    try:
        # utf-8-sig: editors hide a byte-order mark, so it must not count as a column (nor reach the model).
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if "\0" in text:  # valid UTF-8 with NUL bytes: UTF-16 text or binary data, as the project index judges it
        raise ValueError(f"{path} is a binary file (it holds NUL bytes), not UTF-8 text")
    prefix, suffix = split_at(text, args.line, args.column)
    if args.project is not None and not Path(args.project).is_dir():
        raise NotADirectoryError(f"--project {args.project} is not a directory")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from mellum.engine import SamplingParams

    # The engine's own checks, before the model loads: "temperature must be a finite number >= 0, got nan".
    SamplingParams(max_new_tokens=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    from mellum.checkpoint import model_directory

    model_dir = model_directory(args.model) if args.model else default_model_dir()

    rel = _display_path(path, args.project)
    service = remote_service(model_dir, args)
    if service is None:
        options = {"kv_dtype": args.kv_dtype} if args.kv_dtype else {}
        service = CompletionService.from_pretrained(model_dir, device=args.device, quantize=args.quantize, **options)
    try:
        request = CompletionRequest(path=rel, prefix=prefix, suffix=suffix, project_root=args.project,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, multiline=args.multiline,
                                    return_prompt=args.show_prompt)
        completion = service.complete(request)
        service_window = service.window
    finally:
        service.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(completion), ensure_ascii=False, indent=2))
        return 0
    if args.show_prompt:
        print(f"--- prompt ({completion.prompt_tokens} tokens) ---\n{completion.prompt}\n--- completion ---",
              file=sys.stderr)
    sys.stdout.write(completion.text + ("\n" if not completion.text.endswith("\n") else ""))
    if completion.truncated:
        print(f"mellum: note: the file does not fit the model's {service_window}-token window: the prompt leaves out "
              "text far from the cursor (--show-prompt shows what the model saw)", file=sys.stderr)
    return 0


def _display_path(path: Path, project: str | None) -> str:
    """The file's path as the model sees it: relative to the project (or else the working directory) when inside
    it, else just its name — absolute paths say nothing about the code and differ from training data."""
    for root in ([project] if project is not None else []) + ["."]:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name
