"""`mellum lsp`: the language server (inline completion) over stdio, or TCP with --tcp HOST:PORT."""

from __future__ import annotations

import logging
import sys

from mellum.commands.serve import (add_model_arguments, check_can_listen, check_model_arguments, load_service,
                                   model_dir, model_name, open_telemetry)


def configure(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tcp", metavar="HOST:PORT",
                        help="listen on TCP instead of stdio (e.g. 127.0.0.1:2087)")
    parser.add_argument("--log-file", metavar="FILE", help="write the server's log here (stdout carries LSP)")
    parser.add_argument("--debounce-ms", type=float, default=None,
                        help="wait after an automatic trigger before computing (default 75; clients may override)")


def run(args) -> int:
    from mellum.serve.lsp import LspConfig, create_server

    check_model_arguments(args)
    if args.debounce_ms is not None and not 0 <= args.debounce_ms <= 10_000:
        raise ValueError(f"--debounce-ms must be 0-10000 (milliseconds), got {args.debounce_ms}")
    host = port = None
    if args.tcp:
        host, _, port_text = args.tcp.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # [::1]:2087
        if not host or not port_text.isdigit():
            raise ValueError(f"--tcp takes HOST:PORT, e.g. 127.0.0.1:2087; got {args.tcp!r}")
        port = int(port_text)
        check_can_listen(host, port)  # before the model loads
    if args.log_file:
        try:
            open(args.log_file, "a").close()
        except OSError as exc:
            raise ValueError(f"cannot write --log-file {args.log_file}: {exc.strerror or exc}") from None
    # stdout carries the protocol: logs go to a file, or to stderr (warnings only).
    where = {"filename": args.log_file} if args.log_file else {"stream": sys.stderr}
    logging.basicConfig(level=logging.INFO if args.log_file else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", **where)
    config = LspConfig() if args.debounce_ms is None else LspConfig(debounce_ms=args.debounce_ms)
    telemetry = open_telemetry(args)
    path = model_dir(args)
    server = create_server(path, telemetry=telemetry, config=config, workers=args.workers, max_queue=args.max_queue,
                           load_service=lambda p: load_service(p, args), model_name=model_name(args, path))
    try:
        if host:
            server.start_tcp(host, port)  # says "mellum: language server on HOST:PORT" once it listens
        else:
            server.start_io()
    finally:
        server.mellum.close()
        if telemetry is not None:
            telemetry.close()
    return 0

