"""The language server as a subprocess, driven by pygls' client: initialize → didOpen → inlineCompletion →
didChange → cancel, plus the suggestion cache, telemetry, status, configuration and bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

import pytest

from .conftest import PYTHON, server_env

pytestmark = pytest.mark.timeout(90)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 75))


async def _start(model_dir, db, root, options=None, log=None, pulled=None, registrations=None):
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("mellum-test", "0")

    @client.feature(types.WORKSPACE_CONFIGURATION)
    def configuration(ls, params):
        assert params.items[0].section == "mellum"
        return [pulled or {}]

    if registrations is not None:  # a client that watches files for the server when asked (VS Code does)
        @client.feature(types.CLIENT_REGISTER_CAPABILITY)
        def register(ls, params):
            registrations.extend(params.registrations)

    args = ["-m", "mellum.cli", "lsp", "--model", str(model_dir), "--telemetry", str(db)]
    if log:
        args += ["--log-file", str(log)]
    await client.start_io(PYTHON, *args, env=server_env())
    watched = types.DidChangeWatchedFilesClientCapabilities(dynamic_registration=True) if registrations is not None \
        else None
    caps = types.ClientCapabilities(
        workspace=types.WorkspaceClientCapabilities(configuration=True, workspace_folders=True,
                                                    did_change_watched_files=watched),
    )
    result = await client.initialize_async(types.InitializeParams(
        capabilities=caps, process_id=None, root_uri=root.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=root.as_uri(), name="project")],
        initialization_options=options or {},
    ))
    client.initialized(types.InitializedParams())
    return client, result


async def _stop(client):
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()


async def _raw_request(client, msg_id: str, method: str, params: dict):
    """Send a request exactly as given (the typed client would refuse to send invalid params)."""
    import json
    from concurrent.futures import Future

    future: Future = Future()
    client.protocol._request_futures[msg_id] = future
    body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}).encode()
    client.protocol.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return await asyncio.wait_for(asyncio.wrap_future(future), 30)


def _inline(uri, line, character, automatic=False):
    from lsprotocol import types

    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
        context=types.InlineCompletionContext(trigger_kind=kind),
    )


def test_lsp_session(tiny_model_dir, workspace, tmp_path):
    from lsprotocol import types
    from pygls.exceptions import JsonRpcException

    db = tmp_path / "telemetry.db"
    path = workspace / "shop" / "pricing.py"
    text = path.read_text()
    uri = path.as_uri()
    line = text.splitlines().index("def cart_total(cart: Cart) -> Decimal:") + 1  # the first body line

    async def session():
        # initializationOptions first, then the "mellum" section pulled with workspace/configuration wins.
        client, init = await _start(tiny_model_dir, db, workspace, {"maxNewTokens": 3, "multiline": "always"},
                                    log=tmp_path / "lsp.log", pulled={"maxNewTokens": 24, "debounceMs": 2000})
        caps = init.capabilities
        assert caps.inline_completion_provider is not None  # advertised (LSP 3.18)
        assert caps.completion_provider is not None
        assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental

        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        for _ in range(100):
            status = await client.protocol.send_request_async("mellum/status", {})
            if status.config.max_new_tokens == 24:
                break
            await asyncio.sleep(0.05)
        assert status.config.max_new_tokens == 24 and status.config.debounce_ms == 2000
        assert status.config.multiline == "always"  # from initializationOptions, not overridden

        # 1. An invoked request at the start of the body of cart_total.
        result = await client.text_document_inline_completion_async(_inline(uri, line, 4))
        assert isinstance(result, types.InlineCompletionList) and len(result.items) == 1
        item = result.items[0]
        assert isinstance(item.insert_text, str) and item.insert_text.strip()
        assert item.range.start == types.Position(line, 4)
        cid = item.command.arguments[0]

        # 2. The developer types the suggestion's first characters: answered from the cache, same id.
        typed = item.insert_text[:2]
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(line, 4), types.Position(line, 4)), text=typed)]))
        cached = await client.text_document_inline_completion_async(_inline(uri, line, 4 + len(typed), True))
        assert cached.items[0].insert_text == item.insert_text[2:]
        assert list(cached.items[0].command.arguments) == [cid]

        # 3. $/cancelRequest while the request waits out its (long, 2 s) debounce: a cancelled error.
        params = _inline(uri, line + 3, 0, automatic=True)
        future = client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id="cancel-me")
        await asyncio.sleep(0.1)
        client.cancel_request(types.CancelParams(id="cancel-me"))
        with pytest.raises(JsonRpcException) as err:
            await asyncio.wrap_future(future)
        assert err.value.code == -32800  # RequestCancelled

        # 4. A keystroke supersedes a pending automatic request: it ends with no items.
        pending = asyncio.ensure_future(
            client.text_document_inline_completion_async(_inline(uri, line + 3, 0, automatic=True)))
        await asyncio.sleep(0.1)
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=3),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(types.Position(line + 3, 0), types.Position(line + 3, 0)), text="#")]))
        assert len((await pending).items) == 0

        # 5. The completion fallback for editors without inline suggestions.
        fallback = await client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, 6)))
        assert fallback is not None

        # 6. Telemetry over the custom notification and the accept command, then the status request.
        client.protocol.notify("mellum/telemetry", {"id": cid, "event": "shown"})
        client.protocol.notify("mellum/telemetry", {"events": [{"id": cid, "event": "partial", "acceptedText": typed}]})
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="mellum.accepted", arguments=[cid]))
        status = await client.protocol.send_request_async("mellum/status", {})
        assert status.ready and status.served >= 1 and status.cacheHits >= 1 and status.cancelled >= 2
        assert status.config.max_new_tokens == 24 and status.config.multiline == "always"

        # 7. Bad input: unknown telemetry event, negative and out-of-range positions, an unknown method.
        with pytest.raises(JsonRpcException):
            await client.protocol.send_request_async("mellum/telemetry", {"id": cid, "event": "clicked"})
        with pytest.raises(JsonRpcException):
            await _raw_request(client, "negative", types.TEXT_DOCUMENT_INLINE_COMPLETION, {
                "textDocument": {"uri": uri}, "position": {"line": -1, "character": -5},
                "context": {"triggerKind": 1}})
        far = await client.text_document_inline_completion_async(_inline(uri, 10_000, 10_000))
        assert isinstance(far, types.InlineCompletionList)
        unknown = await client.text_document_inline_completion_async(_inline("file:///nowhere.py", 0, 0))
        assert len(unknown.items) == 0
        with pytest.raises(JsonRpcException):
            await client.protocol.send_request_async("mellum/nope", {})
        status = await client.protocol.send_request_async("mellum/status", {})
        assert status.ready
        # The status reply came after the telemetry notifications were handled (committed in order):
        # kill -9 now, with no shutdown, and the events must still be in the database.
        os.kill(client._server.pid, signal.SIGKILL)
        await client.stop()
        return cid

    cid = _run(session())
    rows = sqlite3.connect(db).execute("SELECT event FROM events WHERE completion_id = ? ORDER BY seq", (cid,))
    assert [r[0] for r in rows] == ["shown", "partial", "accepted"]
    served = sqlite3.connect(db).execute("SELECT path, prompt, model FROM completions WHERE id = ?", (cid,)).fetchone()
    assert served[0] == "shop/pricing.py" and "<fim_middle>" in served[1]
    assert served[2] == tiny_model_dir.name  # the model's name, as `mellum serve` records it (was its full path)


def test_requests_after_shutdown_are_answered_with_an_error(tiny_model_dir, workspace, tmp_path):
    """LSP 3.17 §shutdown: a request after `shutdown` errors with InvalidRequest; it is not left unanswered."""
    from pygls.exceptions import JsonRpcException

    async def session():
        client, _ = await _start(tiny_model_dir, tmp_path / "telemetry.db", workspace)
        await client.shutdown_async(None)
        with pytest.raises(JsonRpcException) as err:
            await _raw_request(client, "late", "mellum/status", {})
        assert err.value.code == -32600  # InvalidRequest
        client.exit(None)
        code = await asyncio.wait_for(client._server.wait(), 30)
        await client.stop()
        return code

    assert _run(session()) == 0  # exit after shutdown: success


def test_an_empty_completion_sends_no_inline_item(tiny_model_dir, workspace, tmp_path):
    """A model that ends at once (end-of-text first) yields no item: an empty one would show a blank ghost text."""
    import shutil

    import mellum
    from lsprotocol import types

    silent = tmp_path / "silent-model"
    shutil.copytree(tiny_model_dir, silent)
    from mellum.tokenizer import Tokenizer

    assert Tokenizer.from_pretrained(silent).eos_id == 0
    model = mellum.load_pretrained(silent)
    model.norm.weight.data.zero_()  # every logit 0: greedy takes the first id, end-of-text
    mellum.save_pretrained(model, silent)
    uri = (workspace / "shop" / "cart.py").as_uri()

    async def session():
        client, _ = await _start(silent, tmp_path / "telemetry.db", workspace)
        client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(
            uri=uri, language_id="python", version=1, text="def f(x):\n    return x\n\n")))
        inline = await client.text_document_inline_completion_async(_inline(uri, 2, 0))
        status = await client.protocol.send_request_async("mellum/status", {})
        await _stop(client)
        return inline, status

    inline, status = _run(session())
    assert len(inline.items) == 0
    assert status.served >= 1  # the request did reach the engine


def test_inline_and_menu_requests_for_one_keystroke_share_one_answer(tiny_model_dir, workspace, tmp_path):
    """VS Code sends textDocument/completion (a trigger character) and textDocument/inlineCompletion for the same
    keystroke: the second must not cancel the first (the ghost text or the menu item would be lost), and the
    engine runs once for both."""
    from lsprotocol import types

    path = workspace / "shop" / "pricing.py"
    text = path.read_text()
    uri = path.as_uri()
    line = text.splitlines().index("def cart_total(cart: Cart) -> Decimal:") + 1

    async def session():
        client, _ = await _start(tiny_model_dir, tmp_path / "telemetry.db", workspace, {"maxNewTokens": 12})
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        menu = asyncio.ensure_future(client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, 4))))
        inline = asyncio.ensure_future(client.text_document_inline_completion_async(_inline(uri, line, 4, True)))
        menu, inline = await asyncio.gather(menu, inline)
        status = await client.protocol.send_request_async("mellum/status", {})
        await _stop(client)
        return menu, inline, status

    menu, inline, status = _run(session())
    assert len(inline.items) == 1 and len(menu.items) == 1
    assert inline.items[0].command.arguments == menu.items[0].command.arguments  # one completion id
    assert menu.items[0].text_edit.new_text == inline.items[0].insert_text
    assert status.served == 1 and status.cancelled == 0


def test_changes_to_documents_never_opened_raise_no_error_in_the_editor(tiny_model_dir, workspace, tmp_path):
    """pygls' own buffer copy failed with KeyError on such a change, and the editor showed it as an error popup."""
    from lsprotocol import types

    uri = (workspace / "shop" / "never_opened.py").as_uri()

    def change(version, text, rng=None):
        event = (types.TextDocumentContentChangeWholeDocument(text=text) if rng is None else
                 types.TextDocumentContentChangePartial(range=rng, text=text))
        return types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version), content_changes=[event])

    async def session():
        client, _ = await _start(tiny_model_dir, tmp_path / "telemetry.db", workspace, {"maxNewTokens": 4})
        shown = []
        client.feature(types.WINDOW_SHOW_MESSAGE)(lambda ls, params: shown.append(params.message))
        client.text_document_did_change(change(2, "x", types.Range(types.Position(3, 0), types.Position(3, 0))))
        unknown = await client.text_document_inline_completion_async(_inline(uri, 0, 1))
        client.text_document_did_change(change(3, "def f(x):\n    return "))  # the whole text: now it is known
        known = await client.text_document_inline_completion_async(_inline(uri, 1, 11))
        client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
        closed = await client.text_document_inline_completion_async(_inline(uri, 1, 11))
        status = await client.protocol.send_request_async("mellum/status", {})
        await _stop(client)
        return shown, unknown, known, closed, status

    shown, unknown, known, closed, status = _run(session())
    assert shown == []
    assert len(unknown.items) == 0 and len(closed.items) == 0
    assert status.served == 1 and status.documents == 0  # the whole-text change was served, then closed
    assert isinstance(known, types.InlineCompletionList)


def test_settings_given_later_shape_the_suggestion_cache(tiny_model_dir, workspace, tmp_path):
    """The suggestion cache was sized from the command line once: cacheEntries from initializationOptions was never
    applied, and after a settings change (another maxNewTokens) the cache kept answering with suggestions made
    under the old settings."""
    from lsprotocol import types

    path = workspace / "shop" / "pricing.py"
    text = path.read_text()
    uri = path.as_uri()
    line = text.splitlines().index("def cart_total(cart: Cart) -> Decimal:") + 1

    async def session():
        client, _ = await _start(tiny_model_dir, tmp_path / "telemetry.db", workspace,
                                 {"maxNewTokens": 4, "cacheEntries": 1})
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

        async def served_after(line_, character):
            await client.text_document_inline_completion_async(_inline(uri, line_, character))
            return (await client.protocol.send_request_async("mellum/status", {})).served

        counts = [await served_after(line, 4)]
        counts.append(await served_after(line, 4))  # the same cursor: from the cache
        counts.append(await served_after(line + 3, 0))  # another cursor takes the one cache entry...
        counts.append(await served_after(line, 4))  # ...so the first is computed again
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"mellum": {"maxNewTokens": 8, "cacheEntries": 1}}))
        counts.append(await served_after(line, 4))  # other settings: not the old suggestion
        counts.append(await served_after(line, 4))
        await _stop(client)
        return counts

    assert _run(session()) == [1, 1, 2, 3, 4, 4]


def test_files_created_or_deleted_on_disk_reach_the_index_through_the_file_watcher(tiny_model_dir, tmp_path):
    """A running server never learned of files created outside the editor (a `git pull`, a new module written in
    the terminal): its project index was built once. Now it asks the client to watch files and re-reads them."""
    import shutil

    from lsprotocol import types

    from .conftest import SAMPLE_PROJECT

    root = tmp_path / "project"
    shutil.copytree(SAMPLE_PROJECT, root)
    db = tmp_path / "telemetry.db"
    main = root / "shop" / "report.py"
    uri = main.as_uri()
    head = "from shop.taxes_extra import surcharge_for_region\n\n\ndef report(region):\n    return "
    new_module = root / "shop" / "taxes_extra.py"

    async def session():
        registrations = []
        client, _ = await _start(tiny_model_dir, db, root, {"maxNewTokens": 2, "debounceMs": 0},
                                 registrations=registrations)
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1, text=head)))
        await client.text_document_inline_completion_async(_inline(uri, 4, 11))  # the project is indexed now
        new_module.write_text("def surcharge_for_region(region):\n    return 0.07  # WATCHED_NEW_FILE\n")
        client.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(changes=[
            types.FileEvent(uri=new_module.as_uri(), type=types.FileChangeType.Created)]))
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[types.TextDocumentContentChangeWholeDocument(text=head + "surcharge_for_region(")]))
        await client.text_document_inline_completion_async(_inline(uri, 4, 32))
        await _stop(client)
        return registrations

    registrations = _run(session())
    assert [r.method for r in registrations] == [types.WORKSPACE_DID_CHANGE_WATCHED_FILES]
    prompts = [row[0] for row in sqlite3.connect(db).execute("SELECT prompt FROM completions ORDER BY rowid")]
    assert len(prompts) == 2
    assert "WATCHED_NEW_FILE" not in prompts[0] and "WATCHED_NEW_FILE" in prompts[1]
