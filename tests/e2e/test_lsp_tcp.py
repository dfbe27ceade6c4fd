"""`mellum lsp --tcp HOST:PORT`: the same server over a socket, for clients that connect to a running server."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.ports import free_port

from .conftest import PYTHON, server_env

pytestmark = pytest.mark.timeout(120)


def test_lsp_over_tcp(tiny_model_dir):
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "mellum.cli", "lsp", "--model", str(tiny_model_dir), "--no-telemetry",
                             "--tcp", f"127.0.0.1:{port}"], env=server_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert f"127.0.0.1:{port}" in proc.stderr.readline()  # printed once the model is loaded

        async def session():
            client = LanguageClient("tcp-test", "0")
            for _ in range(50):  # the socket opens right after the message
                try:
                    await client.start_tcp("127.0.0.1", port)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            init = await client.initialize_async(types.InitializeParams(
                capabilities=types.ClientCapabilities(), process_id=None))
            client.initialized(types.InitializedParams())
            client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
                uri="untitled:Untitled-1", language_id="python", version=1, text="def f():\n    ")))
            result = await client.text_document_inline_completion_async(types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri="untitled:Untitled-1"),
                position=types.Position(1, 4),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
            await client.shutdown_async(None)
            client.exit(None)
            return init, result

        init, result = asyncio.run(asyncio.wait_for(session(), 60))
        assert init.capabilities.inline_completion_provider is not None
        assert len(result.items) == 1 and isinstance(result.items[0].insert_text, str)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# ---- the client goes without `exit`: the server ends at once, with one line in the log and status 0 -----------
def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _reply(sock: socket.socket) -> dict:
    """The next message from the server (the socket has a timeout)."""
    def more() -> bytes:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        return chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += more()
    return json.loads(body[:length])


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, as when a client crashes with data unread."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _lsp_tcp(model_dir, *extra):
    """(process, connected socket) for `mellum lsp --tcp`; the socket times out after 10 s."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "mellum.cli", "lsp", "--model", str(model_dir), "--no-telemetry",
                             "--tcp", f"127.0.0.1:{port}", *extra], env=server_env(), stderr=subprocess.PIPE,
                            text=True)
    assert f"127.0.0.1:{port}" in proc.stderr.readline()  # printed once the model is loaded, just before the bind
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            return proc, sock
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def _ended(proc: subprocess.Popen) -> str:
    """Waits (10 s at most) for the server to end on its own; its log after the start line. Kills it otherwise."""
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    log = proc.stderr.read()
    proc.stderr.close()
    assert code == 0, f"exit status {code}; log:\n{log}"
    return log


def _initialize(options: dict | None = None) -> bytes:
    return _frame({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                   "params": {"processId": None, "capabilities": {}, "initializationOptions": options or {}}})


@pytest.mark.parametrize("how", ["reset", "close", "half-close"])
def test_lsp_over_tcp_ends_when_the_client_goes_during_initialize(tiny_model_dir, how):
    """The client sends `initialize` and goes without reading the reply. A reset used to escape pygls' connection
    callback ("Unhandled exception in client_connected_cb", a traceback) and the server listened on forever."""
    proc, sock = _lsp_tcp(tiny_model_dir)
    try:
        sock.sendall(_initialize())
        if how == "reset":
            _reset(sock)
        elif how == "close":
            sock.close()
        else:  # the client says it sends nothing more, and waits
            sock.shutdown(socket.SHUT_WR)
        log = _ended(proc)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    went = "went away (connection reset by peer)" if how == "reset" else "closed the connection"
    assert len(log.splitlines()) == 1 and f"the client {went}: shutting down" in log, log


class _SilentBackend:
    """An OpenAI-compatible server that takes requests and never answers: the engine call stays in flight."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self.asked = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._held.append(conn)
            if conn.recv(65536):
                self.asked.set()

    def close(self):
        self._listener.close()
        for conn in self._held:
            conn.close()


def test_lsp_over_tcp_ends_when_the_client_resets_with_a_completion_in_flight(tiny_model_dir):
    """Reset while the engine works on a completion (a backend that never answers, and a deadline of a minute): the
    server ends within seconds, its engine call stopped rather than waited for."""
    backend = _SilentBackend()
    proc, sock = _lsp_tcp(tiny_model_dir, "--backend-url", backend.url)
    try:
        sock.sendall(_initialize({"deadlineMs": 60_000}))
        assert "capabilities" in _reply(sock)["result"]
        uri = "untitled:Untitled-1"
        sock.sendall(_frame({"jsonrpc": "2.0", "method": "initialized", "params": {}})
                     + _frame({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
                         "uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    "}}})
                     + _frame({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
                         "textDocument": {"uri": uri}, "position": {"line": 1, "character": 4},
                         "context": {"triggerKind": 1}}}))
        assert backend.asked.wait(10)  # the engine is waiting on the backend
        _reset(sock)
        log = _ended(proc)
    finally:
        sock.close()
        backend.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(log.splitlines()) == 1 and "the client went away (connection reset by peer): shutting down" in log, log
