"""Language server: inline code completion for any LSP editor, built on pygls over the completion service.

What the editor sees: `textDocument/inlineCompletion` (LSP 3.18, advertised through `InlineCompletionOptions`)
and a `textDocument/completion` fallback for editors without inline suggestions; incremental document sync;
`$/cancelRequest` and superseding keystrokes stop the engine (a `threading.Event` handed to the service);
a debounce for automatic triggers; a suggestion cache that answers at once while the developer types the first
characters of a suggestion already shown (Tabby and Continue do the same, REFERENCE.md §3); the custom
notification `mellum/telemetry` (shown / accepted / partial / rejected / ignored with the completion id), the
command `mellum.accepted` (run by clients when an item is accepted) and the request `mellum/status`.
Configuration comes from `initializationOptions` and `workspace/configuration` (section "mellum").
One client per server, over stdio or TCP: the server ends when it goes, however it goes (`lsp_io`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from mellum.serve.documents import DocumentStore
from mellum.serve.metrics import Metrics
from mellum.serve.runner import Cancelled, Overloaded, Runner, is_secret

log = logging.getLogger("mellum.lsp")

MULTILINE = {"auto": None, "always": True, "never": False}
# The smallest value each numeric setting takes (deadline_ms: more than 0). A lower or NaN value is ignored like
# any other bad one: a negative maxNewTokens or temperature would make every request fail without a word.
LOWEST = {"max_new_tokens": 1, "temperature": 0.0, "debounce_ms": 0.0, "max_prefix_chars": 0, "max_suffix_chars": 0,
          "max_open_file_chars": 0, "cache_entries": 1, "cache_tail_chars": 0}
# And the largest, where one exists: a debounce of minutes would look like a server that never answers (the same
# bound as `mellum lsp --debounce-ms`).
HIGHEST = {"debounce_ms": 10_000.0}


def _in_range(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if name == "deadline_ms":
        return value > 0
    return math.isfinite(value) and LOWEST.get(name, 0) <= value <= HIGHEST.get(name, math.inf)


@dataclass(frozen=True)
class LspConfig:
    """Client-tunable settings; camelCase keys from the editor map onto these fields (`maxNewTokens` ...)."""

    max_new_tokens: int = 64
    multiline: str = "auto"  # auto (decided from the cursor position) | always | never
    temperature: float = 0.0
    debounce_ms: float = 75.0  # wait this long after an automatic trigger before starting the engine
    deadline_ms: float | None = 3000.0  # the engine stops and returns what it has after this long
    max_prefix_chars: int = 24_000  # text handed to the service around the cursor (it cuts further by tokens)
    max_suffix_chars: int = 8_000
    max_open_file_chars: int = 500_000  # larger open buffers are not offered as context
    cache_entries: int = 100  # Tabby keeps an LRU of 100 suggestions
    cache_tail_chars: int = 2_000  # how much of the prefix a cache entry checks to still be the same place
    project_context: bool = True  # pass the workspace folder so the service can index the project

    def merged(self, options) -> "LspConfig":
        """A copy with the recognised keys of an options dict (camelCase or snake_case) applied."""
        if not isinstance(options, dict):
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for key, value in options.items():
            name = _snake(str(key))
            if name not in fields or value is None:
                continue
            try:
                current = getattr(self, name)
                if name == "multiline" and value not in MULTILINE:
                    raise ValueError(value)
                if isinstance(current, bool) and not isinstance(value, bool):  # bool("false") is True
                    raise ValueError(value)
                converted = type(current)(value) if current is not None else float(value)
                if not _in_range(name, converted):
                    raise ValueError(value)
                changes[name] = converted
            except (TypeError, ValueError, OverflowError):
                log.warning("ignoring setting %s=%r", key, value)
        return dataclasses.replace(self, **changes)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


@dataclass
class _Shown:
    """A suggestion given to the editor, kept to answer the next keystrokes that type it."""

    completion_id: str
    text: str
    prefix_tail: str  # the text just before where the suggestion starts
    suffix_head: str  # and just after it


class SuggestionCache:
    """LRU of recent suggestions per document position; `lookup` finds one the developer is typing through."""

    def __init__(self, entries: int, tail_chars: int):
        self.entries, self.tail_chars = entries, tail_chars
        self._items: OrderedDict[tuple[str, int], _Shown] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, uri: str, text: str, offset: int, completion_id: str, completion: str) -> None:
        if not completion:
            return
        item = _Shown(completion_id, completion, text[max(0, offset - self.tail_chars):offset],
                      text[offset:offset + self.tail_chars])
        with self._lock:
            self._items[(uri, offset)] = item
            self._items.move_to_end((uri, offset))
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def lookup(self, uri: str, text: str, offset: int) -> tuple[str, str] | None:
        """(completion id, remaining text) when the cursor sits inside a shown suggestion, typed as suggested."""
        with self._lock:
            candidates = [(k[1], v) for k, v in self._items.items() if k[0] == uri and 0 <= offset - k[1] < len(v.text)]
        for start, item in sorted(candidates, key=lambda c: -c[0]):  # the nearest start first
            typed = text[start:offset]
            if not item.text.startswith(typed):
                continue
            if text[start - len(item.prefix_tail):start] != item.prefix_tail:
                continue
            # What follows the cursor must still be what followed the suggestion (auto-closed brackets differ).
            if text[offset:offset + self.tail_chars] != item.suffix_head:
                continue
            with self._lock:
                if (uri, start) in self._items:
                    self._items.move_to_end((uri, start))
            return item.completion_id, item.text[len(typed):]
        return None


def _plain(value):
    """pygls hands custom-method params over as namedtuples; turn them back into dicts and lists."""
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def create_server(model_dir=None, telemetry=None, config: LspConfig | None = None, service=None,
                  load_service=None, workers: int = 1, preload: bool = True, model_name: str | None = None,
                  max_queue: int | None = None):
    """Build the pygls server. The model loads here, before the server reads its first message (`preload`; on CPU a
    model loaded on a short-lived thread decodes far slower), or on a worker at the first request without `preload`,
    or is given as `service`. `max_queue` bounds the engine calls queued or running (`Runner`): a completion request
    beyond it gets an empty answer at once.

    `load_service(model_dir)` builds the completion service (default: `CompletionService.from_pretrained`);
    `initializationOptions.model` may name another model directory than `model_dir`.
    """
    from lsprotocol import types
    from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest
    from pygls.lsp.server import LanguageServer
    from pygls.protocol import LanguageServerProtocol
    from pygls.protocol.language_server import lsp_method
    from pygls.protocol.json_rpc import RPCRequest

    from mellum import __version__
    from mellum.serve.telemetry import EVENTS, TelemetryEvent, recorded_reply

    class _Protocol(LanguageServerProtocol):
        """Answers requests whose params do not validate (negative positions, wrong types) with an error.

        pygls would only log them, and the client would wait for a reply forever.
        """

        def structure_message(self, data):
            try:
                return super().structure_message(data)
            except JsonRpcException as exc:
                if isinstance(data, dict) and "id" in data and "method" in data:
                    return _Invalid(data["id"], exc)
                raise

        def handle_message(self, message):
            if isinstance(message, _Invalid):
                self._send_response(message.id, error=message.error.to_response_error())
                return
            if self._shutdown and isinstance(message, RPCRequest):
                # LSP 3.17 §shutdown: requests after `shutdown` error with InvalidRequest; pygls drops them,
                # and the client would wait for a reply forever.
                error = JsonRpcInvalidRequest(f"the server is shut down: {message.method} after shutdown")
                self._send_response(message.id, error=error.to_response_error())
                return
            super().handle_message(message)

        @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
        def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
            # pygls keeps its own copy of the buffers and raises KeyError for a document never opened, which the
            # editor shows as an error popup on every keystroke; our handler (the DocumentStore) decides instead.
            if unquote(params.text_document.uri) in self.workspace.text_documents:
                for change in params.content_changes:
                    self.workspace.update_text_document(params.text_document, change)
            yield self.fm.features[types.TEXT_DOCUMENT_DID_CHANGE], (params,), None

    class _Server(LanguageServer):
        """pygls' server with transports that end it when the client goes, however it goes (`lsp_io`)."""

        def start_io(self, stdin=None, stdout=None):
            from mellum.serve.lsp_io import run_stdio

            run_stdio(self, stdin, stdout)

        def start_tcp(self, host: str, port: int):
            from mellum.serve.lsp_io import run_tcp

            run_tcp(self, host, port)

    server = _Server("mellum", __version__, protocol_cls=_Protocol, max_workers=4)
    state = _State(config or LspConfig(), model_dir, telemetry, service, load_service, workers, model_name, max_queue)
    server.mellum = state  # for tests and the status request
    if preload:
        state.preload()

    # ---- lifecycle and configuration -------------------------------------------------------------------
    @server.feature(types.INITIALIZE)
    def on_initialize(ls, params: types.InitializeParams):
        # The encoding pygls negotiated, in force before any document arrives (not at `initialized`, a notification
        # handled on its own: a didOpen could come first).
        encoding = ls.workspace.position_encoding
        state.documents.encoding = str(getattr(encoding, "value", encoding or "utf-16"))
        state.config = state.config.merged(params.initialization_options)
        options = params.initialization_options
        if isinstance(options, dict) and options.get("model") and str(options["model"]) != str(state.model_dir):
            state.switch_model(str(options["model"]))

    @server.feature(types.SHUTDOWN)
    def on_shutdown(ls, params):
        state.close()

    @server.feature(types.INITIALIZED)
    async def on_initialized(ls, params):
        state.start_loading()
        await _watch_files(ls)
        await _pull_configuration(ls)

    async def _watch_files(ls):
        """Ask the client to report files created, changed or deleted on disk (a `git checkout`, a generator, a
        new file from the terminal): the project index learns of them at once, not at the server's next start."""
        caps = ls.client_capabilities.workspace
        watched = caps.did_change_watched_files if caps else None
        if not (watched and watched.dynamic_registration):
            return
        options = types.DidChangeWatchedFilesRegistrationOptions(
            watchers=[types.FileSystemWatcher(glob_pattern="**/*")])
        try:
            await asyncio.wait_for(ls.client_register_capability_async(types.RegistrationParams(registrations=[
                types.Registration(id="mellum-files", method=types.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                                   register_options=options)])), timeout=5)
        except Exception as exc:  # the index still notices changed and deleted files when it uses them
            log.warning("could not register a file watcher: %s", exc)

    @server.feature(types.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    async def on_watched_files(ls, params: types.DidChangeWatchedFilesParams):
        from mellum.serve.documents import uri_to_path

        paths = [uri_to_path(change.uri) for change in params.changes]
        # Off the event loop: re-reading files waits for the project's lock, which a completion may hold.
        await asyncio.get_running_loop().run_in_executor(None, state.files_changed, ls, paths)

    async def _pull_configuration(ls):
        caps = ls.client_capabilities.workspace
        if not (caps and caps.configuration):
            return
        try:
            result = await asyncio.wait_for(ls.workspace_configuration_async(
                types.ConfigurationParams(items=[types.ConfigurationItem(section="mellum")])), timeout=5)
        except Exception as exc:  # a client that cannot answer keeps the settings it gave at initialize
            log.warning("workspace/configuration failed: %s", exc)
            return
        if result:
            state.config = state.config.merged(_plain(result[0]))

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def on_configuration(ls, params: types.DidChangeConfigurationParams):
        settings = _plain(params.settings)
        if isinstance(settings, dict) and isinstance(settings.get("mellum"), dict):
            state.config = state.config.merged(settings["mellum"])
        else:
            await _pull_configuration(ls)

    # ---- documents -----------------------------------------------------------------------------------
    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls, params: types.DidOpenTextDocumentParams):
        d = params.text_document
        state.documents.open(d.uri, d.text, d.version, d.language_id)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls, params: types.DidChangeTextDocumentParams):
        changes = []
        for c in params.content_changes:
            rng = getattr(c, "range", None)
            span = None if rng is None else (rng.start.line, rng.start.character, rng.end.line, rng.end.character)
            changes.append((c.text, span))
        state.documents.change(params.text_document.uri, changes, params.text_document.version)
        # A keystroke makes any running request for this document stale (Continue: abort on keystroke).
        state.supersede(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls, params: types.DidCloseTextDocumentParams):
        state.supersede(params.text_document.uri)
        state.documents.close(params.text_document.uri)

    # ---- completion ----------------------------------------------------------------------------------
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls, params: types.InlineCompletionParams):
        automatic = params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        found = await state.suggest(ls, params.text_document.uri, params.position, automatic, "lsp/inline")
        if found is None or not found[1]:  # nothing to insert: an empty item would only show a blank ghost text
            return types.InlineCompletionList(items=[])
        cid, text = found
        pos = params.position
        return types.InlineCompletionList(items=[types.InlineCompletionItem(
            insert_text=text, range=types.Range(pos, pos),
            command=types.Command(title="mellum: accepted", command="mellum.accepted", arguments=[cid]),
        )])

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(trigger_characters=[".", "(", " "]))
    async def completion(ls, params: types.CompletionParams):
        found = await state.suggest(ls, params.text_document.uri, params.position, False, "lsp/completion")
        if found is None or not found[1].strip():
            return types.CompletionList(is_incomplete=True, items=[])
        cid, text = found
        first = text.strip().splitlines()[0]
        pos = params.position
        item = types.CompletionItem(
            label=first[:80], kind=types.CompletionItemKind.Snippet, detail="mellum",
            documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```\n{text}\n```"),
            text_edit=types.TextEdit(range=types.Range(pos, pos), new_text=text),
            filter_text=first, sort_text="0", data={"id": cid},
            command=types.Command(title="mellum: accepted", command="mellum.accepted", arguments=[cid]),
        )
        return types.CompletionList(is_incomplete=True, items=[item])

    # ---- telemetry and status ------------------------------------------------------------------------
    @server.feature("mellum/telemetry")
    def on_telemetry(ls, params):
        # Synchronous on purpose: the commit happens before the server reads its next message, so any
        # reply the client gets afterwards (e.g. to mellum/status) proves the event is durable.
        body = _plain(params) or {}
        items = body.get("events") if isinstance(body, dict) and "events" in body else [body]
        events = []
        for e in items if isinstance(items, list) else []:
            if not isinstance(e, dict) or e.get("event") not in EVENTS or not isinstance(e.get("id"), str):
                raise JsonRpcInvalidParams(f"telemetry event needs 'id' and 'event' in {EVENTS}: {e!r}")
            event_id = e.get("eventId", e.get("event_id"))
            if event_id is not None and (not isinstance(event_id, str) or not event_id):
                raise JsonRpcInvalidParams(f"a telemetry 'eventId' is a non-empty string: {e!r}")
            events.append(TelemetryEvent(e["id"], e["event"], e.get("acceptedText", e.get("accepted_text")),
                                         e.get("replacement"), client="lsp", event_id=event_id))
        if state.telemetry is None:  # started with --no-telemetry: nothing is on record
            return {"recorded": 0}
        return recorded_reply(events, state.record(events))

    @server.command("mellum.accepted")
    def on_accepted(ls, *args):
        # pygls spreads the command's `arguments` over the handler's parameters: [completion id].
        cid = args[0] if args and isinstance(args[0], str) else None
        if cid:
            state.record([TelemetryEvent(cid, "accepted", client="lsp")])

    @server.feature("mellum/status")
    def status(ls, params):
        return state.status()

    return server


@dataclass(eq=False)
class _Pending:
    """The engine work for one document text and cursor, shared by the requests that ask for exactly that."""

    text: str
    offset: int
    cancel: threading.Event
    task: asyncio.Future
    waiters: int = 0


class _Invalid:
    def __init__(self, msg_id, error):
        self.id, self.error = msg_id, error


class _State:
    """Everything the handlers share: documents, the runner, in-flight requests, the suggestion cache."""

    def __init__(self, config: LspConfig, model_dir, telemetry, service, load_service, workers: int,
                 model_name: str | None = None, max_queue: int | None = None):
        self.config = config
        self.model_dir = model_dir
        # The name telemetry records (as `mellum serve` does: a hub id as given, else the directory's name).
        self.model_name = model_name or (Path(str(model_dir)).name if model_dir is not None else "")
        self.telemetry = telemetry
        self.documents = DocumentStore()
        self.metrics = Metrics()
        self.inflight: dict[str, _Pending] = {}  # per document: the engine work for its latest cursor
        self._workers, self._max_queue = workers, max_queue
        self.runner: Runner | None = self._runner(service) if service else None
        self._load_service = load_service
        self._loading: asyncio.Future | None = None
        self.load_error: str | None = None
        self.started = time.time()
        self.served = 0
        self.last_latency_ms: float | None = None
        self.last: dict | None = None  # the latest engine completion: id, timings, token counts

    @property
    def config(self) -> LspConfig:
        return self._config

    @config.setter
    def config(self, config: LspConfig) -> None:
        """New settings (at initialize, from workspace/configuration, on a change) start an empty suggestion cache of
        their size: suggestions cached under other settings (another maxNewTokens, multiline, temperature) are not
        what these would give."""
        if config != getattr(self, "_config", None):
            self._config = config
            self.cache = SuggestionCache(config.cache_entries, config.cache_tail_chars)

    # ---- model ---------------------------------------------------------------------------------------
    def preload(self) -> None:
        """Load the model now, on the calling (main) thread, before the server reads its first message.

        Measured on CPU: a service loaded on a thread that then exits decodes 40-80x slower than one loaded on
        a thread that lives on (torch/OpenMP per-thread state), so the editor's `initialize` waits for the load.
        """
        if self.runner is None and self.model_dir is not None:
            self._load()

    def switch_model(self, model_dir: str) -> None:
        """`initializationOptions.model` names another model: load that one instead (on the server's thread)."""
        from mellum.checkpoint import model_label

        if self.runner is not None:
            self.runner.close()
            close = getattr(self.runner.service, "close", None)
            if close is not None:
                close()
        self.runner, self._loading, self.load_error = None, None, None
        self.model_dir, self.model_name = model_dir, model_label(model_dir, model_dir)
        self._load()

    def start_loading(self) -> None:
        """Fallback when nothing was loaded up front: load on a worker thread."""
        if self.runner is not None or self._loading is not None or self.load_error is not None:
            return
        self._loading = asyncio.get_running_loop().run_in_executor(None, self._load)

    def close(self) -> None:
        """Stop in-flight work and free the engine (at `shutdown`, and again harmlessly at exit)."""
        for pending in list(self.inflight.values()):
            pending.cancel.set()
        runner, self.runner = self.runner, None
        self.load_error = self.load_error or "the server is shutting down"
        if runner is not None:
            runner.close()
            close = getattr(runner.service, "close", None)
            if close is not None:
                close()

    def _load(self) -> None:
        try:
            if self._load_service is not None:
                service = self._load_service(self.model_dir)
            else:
                from mellum.complete import CompletionService

                service = CompletionService.from_pretrained(self.model_dir)
            self.runner = self._runner(service)
        except Exception as exc:
            self.load_error = f"could not load the model from {self.model_dir}: {exc}"
            log.error(self.load_error)

    def _runner(self, service) -> Runner:
        return Runner(service, self.metrics, self.telemetry, self._workers, model_name=self.model_name,
                      max_queue=self._max_queue)

    async def ready(self) -> Runner:
        if self.runner is None:
            self.start_loading()
            if self._loading is not None:
                await asyncio.shield(self._loading)
        if self.runner is None:
            raise Cancelled(self.load_error or "model not loaded")
        return self.runner

    # ---- requests ------------------------------------------------------------------------------------
    def supersede(self, uri: str) -> None:
        pending = self.inflight.pop(uri, None)
        if pending is not None:
            pending.cancel.set()
            self.metrics.record(self.metrics.cancelled.inc, endpoint="superseded")

    def _workspace_root(self, ls, path: str) -> str | None:
        """The workspace folder holding `path` (the innermost one); None outside every workspace."""
        roots = []
        try:
            ws = ls.workspace
            roots = [f.uri for f in ws.folders.values()] + ([ws.root_uri] if ws.root_uri else [])
        except Exception:
            return None
        from mellum.serve.documents import uri_to_path

        best = None
        target = Path(path)
        for uri in roots:
            root = Path(uri_to_path(uri))
            if (target == root or root in target.parents) and (best is None or len(str(root)) > len(str(best))):
                best = root
        return str(best) if best else None

    def files_changed(self, ls, paths: list[str]) -> None:
        """Files changed on disk: each project index that exists re-reads them (created ones join, deleted ones
        leave). An open buffer stays as the editor has it."""
        service = self.runner.service if self.runner is not None else None
        if service is None or not hasattr(service, "packer"):
            return
        open_paths = set(self.documents.snapshot())
        for path in paths:
            root = self._workspace_root(ls, path)
            if root is None or path in open_paths:
                continue
            packer, lock = service.packer(root, create=False)
            if packer is not None and packer.index is not None:
                with lock:
                    packer.index.update(path)

    def _open_files(self, root: str | None, skip: str) -> dict[str, str]:
        if root is None:
            return {}
        out = {}
        for path, text in self.documents.snapshot().items():
            inside = Path(path).is_relative_to(root)
            if path != skip and inside and len(text) <= self.config.max_open_file_chars and not is_secret(path, text):
                out[path] = text
        return out

    async def suggest(self, ls, uri: str, position, automatic: bool, endpoint: str) -> tuple[str, str] | None:
        """(completion id, text) at a position, from the cache or the engine; None when there is nothing.

        A request for the very text and cursor of the running one joins it instead of superseding it: VS Code
        sends textDocument/completion (a trigger character) and textDocument/inlineCompletion for one keystroke,
        and cancelling either loses the menu item or the ghost text. The engine work stops only when every
        request waiting on it is cancelled, or a keystroke makes it stale.
        """
        doc = self.documents.get(uri)
        if doc is None:
            return None
        text = doc.text
        offset = doc.offset(position.line, position.character)
        hit = self.cache.lookup(uri, text, offset)
        if hit is not None:
            self.metrics.record(self.metrics.cache.inc, result="hit")
            return hit
        self.metrics.record(self.metrics.cache.inc, result="miss")
        pending = self.inflight.get(uri)
        # `is`: the store replaces a document's text on every change, so the same object means the same buffer.
        if pending is None or pending.text is not text or pending.offset != offset or pending.cancel.is_set():
            self.supersede(uri)
            cancel = threading.Event()
            pending = _Pending(text, offset, cancel, asyncio.ensure_future(
                self._compute(ls, uri, doc, text, offset, automatic, endpoint, cancel)))
            self.inflight[uri] = pending
        pending.waiters += 1
        try:
            return await asyncio.shield(pending.task)
        except asyncio.CancelledError:  # $/cancelRequest: stop the work once nobody waits for it
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.task.done():
                pending.cancel.set()
                pending.task.cancel()
            raise

    async def _compute(self, ls, uri: str, doc, text: str, offset: int, automatic: bool, endpoint: str,
                       cancel: threading.Event) -> tuple[str, str] | None:
        cfg = self.config
        prefix, suffix = text[max(0, offset - cfg.max_prefix_chars):offset], text[offset:offset + cfg.max_suffix_chars]
        try:
            if automatic and cfg.debounce_ms > 0:
                try:
                    await asyncio.sleep(cfg.debounce_ms / 1000)
                except asyncio.CancelledError:  # $/cancelRequest during the debounce: nothing started yet
                    self.metrics.record(self.metrics.cancelled.inc, endpoint=endpoint)
                    raise
                if cancel.is_set():
                    return None
            runner = await self.ready()
            root = self._workspace_root(ls, doc.path) if cfg.project_context else None
            from mellum.complete import CompletionRequest

            path = str(Path(doc.path).relative_to(root)) if root else Path(doc.path).name or "untitled"
            request = CompletionRequest(
                path=path, prefix=prefix, suffix=suffix, project_root=root,
                open_files=self._open_files(root, doc.path), max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, multiline=MULTILINE.get(cfg.multiline), deadline_ms=cfg.deadline_ms,
            )
            served = await runner.complete(request, cancel, endpoint, source="lsp")
        except Cancelled:
            return None
        except Overloaded as exc:  # an empty answer, not an error popup per keystroke; the next keystroke asks again
            log.info("completion refused: %s", exc)
            return None
        except ValueError as exc:  # the service's user-facing errors: no suggestion, keep serving
            log.warning("completion failed: %s", exc)
            return None
        finally:
            pending = self.inflight.get(uri)
            if pending is not None and pending.cancel is cancel:
                del self.inflight[uri]
        completion = served.completion
        self.served += 1
        self.last_latency_ms = served.latency_ms
        self.last = {
            "id": completion.id, "latencyMs": round(served.latency_ms, 3), "stopReason": completion.stop_reason,
            "promptTokens": completion.prompt_tokens, "cachedTokens": completion.cached_tokens,
            "generatedTokens": completion.generated_tokens,
            "timingsMs": {k: round(float(v), 3) for k, v in (completion.timings_ms or {}).items()},
        }
        self.cache.put(uri, text, offset, completion.id, completion.text)
        return completion.id, completion.text

    # ---- telemetry and status ------------------------------------------------------------------------
    def record(self, events) -> list:
        """Store the events; returns those stored now (an event already on record, a client's retry, is not)."""
        if self.telemetry is None or not events:
            return []
        stored = self.telemetry.record_events(events)
        for e in stored:
            self.metrics.record(self.metrics.telemetry.inc, event=e.event)
        return stored

    def status(self) -> dict:
        m = self.metrics
        return {
            "model": str(self.model_dir) if self.model_dir else None,
            "ready": self.runner is not None,
            "loadError": self.load_error,
            "uptimeS": round(time.time() - self.started, 3),
            "documents": len(self.documents),
            "served": self.served,
            "inflight": len(self.inflight),
            "queueDepth": self.runner.queue_depth if self.runner else 0,
            "maxQueue": self.runner.max_queue if self.runner else None,
            "overloaded": int(sum(m.overloaded.values.values())),
            "lastLatencyMs": self.last_latency_ms,
            "last": self.last,
            "cacheHits": int(m.cache.get(result="hit")),
            "cacheMisses": int(m.cache.get(result="miss")),
            "cancelled": int(sum(m.cancelled.values.values())),
            "telemetry": self.telemetry.counts() if self.telemetry is not None else None,
            "config": dataclasses.asdict(self.config),
        }
