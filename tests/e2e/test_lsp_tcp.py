"""`mellum lsp --tcp HOST:PORT`: the same server over a socket, for clients that connect to a running server."""

from __future__ import annotations

import asyncio
import subprocess

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
