"""How the language server talks to its one client, over stdio or TCP, and ends when the client goes.

However it goes (`exit` aside, which ends the process from its handler): its stream ends (a clean close, a
half-close, stdin closed), is reset (a crash, a kill), or a reply cannot be written to it (a broken pipe). The server
then logs one line saying which and returns, so `mellum lsp` exits with status 0.

pygls' own transports do not: its `start_tcp` stops only when the stream ends cleanly, a reset escaping its
connection callback ("Unhandled exception in client_connected_cb", a traceback) while the server listens on forever;
its stdio reads block on its thread pool, which the interpreter joins at exit; and a reply to a client that is gone
raises BrokenPipeError into the handler that was replying (a traceback per reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading

log = logging.getLogger("mellum.lsp")


def run_stdio(server, stdin=None, stdout=None) -> None:
    """Serve the client on stdin/stdout (pygls' `start_io`) until it goes."""
    try:
        asyncio.run(_session(server, _ThreadReader(stdin or sys.stdin.buffer),
                             _PipeWriter(stdout or sys.stdout.buffer)))
    except (KeyboardInterrupt, SystemExit):  # as pygls: `exit` (and Ctrl-C) end a stdio server with status 0
        pass


def run_tcp(server, host: str, port: int) -> None:
    """Serve the first client to connect on HOST:PORT (pygls' `start_tcp`) until it goes."""
    asyncio.run(_serve_tcp(server, host, port))


async def _serve_tcp(server, host: str, port: int) -> None:
    """Serve the first client to connect, then stop listening: a second one would take over the first one's replies
    (pygls has one protocol and one writer)."""
    accepted = asyncio.get_running_loop().create_future()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if accepted.done():
            writer.close()
        else:
            accepted.set_result((reader, writer))

    server._server = listener = await asyncio.start_server(connected, host, port)
    # Said once the port is bound, so that a client reading it can connect at once.
    print(f"mellum: language server on {host}:{port}", file=sys.stderr, flush=True)
    try:
        reader, writer = await accepted
    finally:
        listener.close()
    try:
        await _session(server, reader, writer)
    finally:
        writer.close()


async def _session(server, reader, out) -> None:
    """Serve one client until it goes: its stream ends or is reset, or a reply cannot be written to it. Says which in
    one log line and stops the server. (`exit` ends the process from its handler, through SystemExit.)"""
    from pygls.io_ import run_async

    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    server.protocol.set_writer(_Writer(out, gone))
    server._stop_event = threading.Event()
    reading = asyncio.ensure_future(run_async(stop_event=server._stop_event, reader=reader, protocol=server.protocol,
                                              error_handler=server.report_server_error))
    try:
        await asyncio.wait([reading, gone], return_when=asyncio.FIRST_COMPLETED)
        failed = reading.exception() if reading.done() else None  # retrieved, or asyncio logs it at exit
        error = gone.result() if gone.done() else failed
    finally:
        reading.cancel()
        _settle(gone, None)  # replies still on their way (cancelled requests) are dropped
    if error is not None and not isinstance(error, (OSError, EOFError)):
        raise error
    if error is None:
        how = "closed the connection"
    elif isinstance(error, asyncio.IncompleteReadError):
        how = "went away in the middle of a message"
    else:
        how = f"went away ({(getattr(error, 'strerror', None) or str(error) or type(error).__name__).lower()})"
    # Expected after `shutdown`; otherwise the editor crashed or was killed, which the log should say.
    (log.info if server.protocol._shutdown else log.warning)("the client %s: shutting down", how)
    server.shutdown()


class _Writer:
    """pygls' writer to the client, over either transport, noticing when it is gone: a write that fails (broken pipe,
    reset) ends the session, where pygls would raise it into whichever handler was replying. Later writes are dropped.
    """

    def __init__(self, out, gone: asyncio.Future):
        self._out, self._gone = out, gone

    def write(self, data: bytes) -> None:
        if self._gone.done():
            return
        try:
            self._out.write(data)
        except OSError as exc:
            with contextlib.suppress(RuntimeError):  # from a thread, after the loop closed
                self._gone.get_loop().call_soon_threadsafe(_settle, self._gone, exc)

    def close(self):
        return self._out.close()


class _PipeWriter:
    """stdout for pygls: each message written and flushed. Once the pipe is broken the descriptor is pointed at
    /dev/null, or the interpreter's own flush at exit fails too (exit status 120; Python docs, "Note on SIGPIPE")."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except BrokenPipeError:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
            raise

    def close(self) -> None:
        self._stream.close()


class _ThreadReader:
    """pygls' async reader over a blocking stream (stdin), read on one daemon thread. pygls reads on its thread pool,
    whose threads the interpreter waits for at exit: a read blocked on a client that stopped talking but left the
    pipe open would keep the process alive."""

    def __init__(self, stream):
        # A file object of our own over the descriptor: the interpreter closes sys.stdin at exit, and would abort
        # ("could not acquire lock for <_io.BufferedReader name='<stdin>'>") while the thread holds it in a read.
        with contextlib.suppress(AttributeError, OSError):  # (a stream without a descriptor: read as it is)
            stream = open(stream.fileno(), "rb", closefd=False)
        self._stream = stream
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="mellum-lsp-stdin", daemon=True).start()

    def readline(self) -> asyncio.Future:
        return self._ask(self._stream.readline)

    async def readexactly(self, n: int) -> bytes:
        data = await self._ask(self._stream.read, n)
        if len(data) < n:  # the stream ended in the middle of a message
            raise asyncio.IncompleteReadError(data, n)
        return data

    def _ask(self, read, *args) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._asks.put((future, read, args))
        return future

    def _work(self) -> None:
        while True:
            future, read, args = self._asks.get()
            try:
                data, error = read(*args), None
            except Exception as exc:  # an I/O error, or the stream closed under it
                data, error = None, exc
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, data, error)
            except RuntimeError:  # the loop is closed: nobody waits for this read any more
                return


def _settle(future: asyncio.Future, result, error: Exception | None = None) -> None:
    """Complete `future` unless it is done already (a read the session cancelled; a client found gone twice)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
