"""`mellum lsp` over stdio when the editor goes without `exit` (it crashed, or was killed): the server ends at once
with one line in the log and status 0, and no traceback per reply it could not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def _frame(message: dict) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _lsp(model_dir) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "mellum.cli", "lsp", "--model", str(model_dir), "--no-telemetry"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _session(uri: str) -> bytes:
    """initialize, initialized, didOpen and an inline completion request, as an editor sends them."""
    return b"".join(_frame(m) for m in [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"processId": None, "capabilities": {}}},
        {"jsonrpc": "2.0", "method": "initialized", "params": {}},
        {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    "}}},
        {"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
            "textDocument": {"uri": uri}, "position": {"line": 1, "character": 4}, "context": {"triggerKind": 1}}},
    ])


@pytest.mark.parametrize("how", ["stdout closed", "killed", "stdin closed"])
def test_lsp_over_stdio_ends_when_the_client_goes(tiny_model_dir, how):
    """stdout closed: the client stopped reading but holds stdin open; the first reply meets a broken pipe (pygls
    logged tracebacks and read on forever). killed: both pipes close with requests unanswered (a traceback for
    each). stdin closed: the client hangs up after the initialize reply."""
    proc = _lsp(tiny_model_dir)
    try:
        if how != "stdin closed":
            proc.stdout.close()
        proc.stdin.write(_session("untitled:Untitled-1"))
        proc.stdin.flush()
        if how == "stdin closed":
            assert proc.stdout.read(len(b"Content-Length:")) == b"Content-Length:"  # the initialize reply
        if how != "stdout closed":
            proc.stdin.close()
        try:
            code = proc.wait(20)  # 20 s: the model loads first
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            pipe.close()
        log = proc.stderr.read().decode()
        proc.stderr.close()
    went = "closed the connection" if how == "stdin closed" else "went away (broken pipe)"
    assert code == 0 and len(log.splitlines()) == 1 and f"the client {went}: shutting down" in log, (code, log)
