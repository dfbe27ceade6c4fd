"""`mellum serve`: the HTTP completion server (OpenAI-compatible /v1/completions, native /v1/fim, telemetry)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def add_model_arguments(parser) -> None:
    """Model and telemetry options shared by `mellum serve` and `mellum lsp`."""
    parser.add_argument("--model", metavar="DIR",
                        help="model directory (config.json, safetensors, tokenizer.json) or hub id owner/name; "
                             "default: the bundled mellum-tiny, or $MELLUM_MODEL")
    parser.add_argument("--device", default="cpu", help="torch device for the engine (default: cpu)")
    parser.add_argument("--telemetry", metavar="DB",
                        help="SQLite file for completion telemetry (default: $MELLUM_TELEMETRY or "
                             "~/.local/state/mellum/telemetry.db)")
    parser.add_argument("--no-telemetry", action="store_true", help="record nothing about served completions")
    parser.add_argument("--workers", type=int, default=1,
                        help="engine worker threads (default 1: one request computes at a time, others queue)")
    parser.add_argument("--max-queue", type=int, default=None, metavar="N",
                        help="most completion requests queued or running on the engine at once; beyond it a request "
                             "is refused at once instead of waiting (HTTP 429 with Retry-After, an empty LSP answer) "
                             "(default: 4 per --workers thread; 0 = no limit)")
    parser.add_argument("--prefix-cache-mb", type=float, default=None,
                        help="memory budget of the engine's cross-request prefix (KV) cache (default 256; 0 = off)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only quantization")
    parser.add_argument("--kv-dtype", choices=["float32", "float16"], default=None,
                        help="KV cache element type on CPU: float32 (default, exact) or float16 (half the cache "
                             "memory and of the bytes attention reads per decode step; keys and values rounded)")
    parser.add_argument("--kv-cache-mb", type=float, default=None,
                        help="memory budget of the engine's KV cache: concurrent sequences are limited to what fits "
                             "(default on CPU: a quarter of the machine's memory)")
    add_backend_arguments(parser)


def add_backend_arguments(parser) -> None:
    """A remote OpenAI-compatible server as the engine (shared by `serve`, `lsp` and `complete`)."""
    parser.add_argument("--backend-url", metavar="URL",
                        help="generate on an OpenAI-compatible /v1/completions server (vLLM, llama.cpp's llama-server "
                             "with a `mellum export gguf` file) instead of in-process: --model then only supplies the "
                             "tokenizer and config, and the engine options (--device, --quantize, --kv-dtype and the "
                             "cache budgets) do not apply")
    parser.add_argument("--backend-model", metavar="NAME",
                        help="the model's name on that server (default: the --model directory's name)")
    parser.add_argument("--backend-api-key", default=os.environ.get("MELLUM_BACKEND_API_KEY"), metavar="KEY",
                        help="bearer token for that server (default: $MELLUM_BACKEND_API_KEY)")


def model_name(args, path: Path) -> str:
    """How clients (and a --backend-url server, by default) know the model: `checkpoint.model_label`."""
    from mellum.checkpoint import model_label

    return model_label(args.model, path)


def remote_service(path, args):
    """The completion service over --backend-url, or None when the engine runs in-process."""
    if not args.backend_url:
        return None
    from mellum.complete import CompletionService

    return CompletionService.from_remote(path, args.backend_url, args.backend_model or model_name(args, path),
                                         args.backend_api_key)


def load_service(path, args):
    """The completion service for `path` with the engine options given on the command line."""
    from mellum.complete import CompletionService

    if (service := remote_service(path, args)) is not None:
        return service

    options = {name: value for name, value in (("prefix_cache_mb", args.prefix_cache_mb),
                                               ("kv_cache_mb", args.kv_cache_mb),
                                               ("kv_dtype", args.kv_dtype)) if value is not None}
    return CompletionService.from_pretrained(path, device=args.device, quantize=args.quantize, **options)


def check_model_arguments(args) -> None:
    """Refuse impossible engine options before the model loads (a server that loaded for a minute and then fails,
    or an LSP server whose every request fails, helps nobody)."""
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.max_queue is not None and args.max_queue != 0 and args.max_queue < args.workers:
        # Below --workers some workers could never run (and a negative limit means nothing).
        raise ValueError(f"--max-queue must be 0 (no limit) or at least --workers ({args.workers}), got "
                         f"{args.max_queue}")
    if args.prefix_cache_mb is not None and not args.prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be 0 (off) or more, got {args.prefix_cache_mb}")
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        raise ValueError(f"--kv-cache-mb must be more than 0, got {args.kv_cache_mb}")


def check_can_listen(host: str, port: int) -> None:
    """Refuse an address the server could not listen on (port in use, unknown host, port out of range) before the
    model loads: the bind itself comes only after a load that takes minutes for a large model."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"cannot listen on {host}:{port}: ports are 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and asyncio bind
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def model_dir(args) -> Path:
    from mellum.assets import default_model_dir

    if args.model:
        from mellum.checkpoint import model_directory

        return model_directory(args.model)  # a hub id is downloaded (or found in the hub cache)
    return default_model_dir()


def open_telemetry(args):
    if args.no_telemetry:
        return None
    from mellum.serve.telemetry import TelemetryStore, default_path

    return TelemetryStore(args.telemetry or default_path())


def configure(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: only this machine; 0.0.0.0 exposes the model)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get("MELLUM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $MELLUM_API_KEY; none when unset)")
    parser.add_argument("--workspace", action="append", default=[], metavar="DIR",
                        help="a project root clients may name as project_root in /v1/fim (repeatable); "
                             "context is never read outside these")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="largest request body accepted (default 4 MiB)")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a client may ask for")


def run(args) -> int:
    from mellum.serve.http import HttpConfig, create_app, run_server

    check_model_arguments(args)
    for w in args.workspace:
        if not Path(w).is_dir():
            raise NotADirectoryError(f"--workspace {w} is not a directory")
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    if args.max_body_bytes < 1024:  # a completion request with any code in it is larger
        raise ValueError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    check_can_listen(args.host, args.port)
    path = model_dir(args)
    print(f"mellum: loading {path}", file=sys.stderr, flush=True)
    service = load_service(path, args)
    telemetry = open_telemetry(args)
    config = HttpConfig(host=args.host, port=args.port, api_key=args.api_key or None,
                        max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
                        workspaces=tuple(args.workspace), model_name=model_name(args, path),
                        max_queue=args.max_queue)
    app = create_app(service, config, telemetry=telemetry, workers=args.workers)
    auth = "bearer key required" if config.api_key else "no auth"
    where = f"telemetry → {telemetry.path}" if telemetry else "telemetry off"
    print(f"mellum: serving {path.name} on http://{args.host}:{args.port} ({auth}; {where})", file=sys.stderr,
          flush=True)
    try:
        run_server(app, config)
    finally:
        service.close()
        if telemetry is not None:
            telemetry.close()
    return 0
