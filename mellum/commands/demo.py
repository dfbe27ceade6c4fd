"""`mellum demo`: start the language server on the sample project, open files, complete at a few cursors, show it.

The demo drives the real `mellum lsp` server over stdio with pygls' LSP client, the way an editor does:
initialize with the project as workspace folder, didOpen a buffer (the code after the cursor on the demo's
line is cut away, in memory only), `textDocument/inlineCompletion`, then type the suggestion's first
characters and ask again (answered from the suggestion cache). Timings are the client's round trip plus
the server's own breakdown (`mellum/status`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sample_project"


@dataclass(frozen=True)
class Spot:
    """A cursor for the demo: in `path`, on the first line starting with `line`, after `keep` (the rest is cut).

    With `body=True` the function's whole body below that line is cut, and the cursor sits on a fresh,
    indented line: a multi-line completion.
    """

    path: str
    line: str
    keep: str
    body: bool = False
    note: str = ""


SPOTS = (
    Spot("shop/pricing.py", "    tax = subtotal", "    tax = ", note="mid-line, after '='"),
    Spot("shop/pricing.py", "    return amount.quantize(", "    return amount.", note="attribute access"),
    Spot("shop/inventory.py", "    def low_stock(", "", body=True, note="a whole method body"),
    Spot("shop/models.py", "        self.items = [item for", "        self.items = [", note="inside brackets"),
)


def configure(parser) -> None:
    parser.add_argument("--model", metavar="DIR",
                        help="model directory or hub id (default: $MELLUM_MODEL or the bundled mellum-tiny)")
    parser.add_argument("--project", metavar="DIR", default=None,
                        help="a copy of examples/sample_project to complete in (the demo's cursors sit on lines of "
                             "its files; default: examples/sample_project)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest suggestion (tokens)")
    parser.add_argument("--no-color", action="store_true", help="plain text output")


def run(args) -> int:
    from mellum.assets import default_model_dir

    from mellum.checkpoint import model_directory

    model = model_directory(args.model) if args.model else default_model_dir()
    project = Path(args.project) if args.project else REPO_EXAMPLES
    if not project.is_dir():
        raise NotADirectoryError(f"no project at {project}: pass --project DIR")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if not any(_cut_file(project, spot) for spot in SPOTS):
        files = ", ".join(sorted({spot.path for spot in SPOTS}))
        raise FileNotFoundError(f"none of the demo's cursors is in {project}: it completes in {files} of "
                                f"examples/sample_project; pass that project or a copy of it")
    color = sys.stdout.isatty() and not args.no_color
    return asyncio.run(_demo(model, project.resolve(), args.max_new_tokens, _Style(color)))


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)


def _cut_file(project: Path, spot: Spot) -> tuple[str, int, int] | None:
    """`_cut` of the spot's file in `project`, or None when the file or its line is not there."""
    path = project / spot.path
    if not path.is_file():
        return None
    try:
        return _cut(path.read_text(encoding="utf-8"), spot)
    except (OSError, UnicodeDecodeError):
        return None


def _cut(text: str, spot: Spot) -> tuple[str, int, int] | None:
    """(buffer text with the code after the cursor cut, cursor line, cursor column) or None if not found."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith(spot.line):
            continue
        if not spot.body:
            lines[i] = spot.keep
            return "\n".join(lines), i, len(spot.keep)
        indent = len(line) - len(line.lstrip()) + 4
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent):
            end += 1
        lines[i + 1:end] = [" " * indent, ""]
        return "\n".join(lines), i + 1, indent
    return None


async def _demo(model: Path, project: Path, max_new_tokens: int, s: _Style) -> int:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    print(s.bold("mellum demo") + f" — model {model.name} ({model}) completing in {project}")
    print(s.dim("starting the language server (mellum lsp) ..."), flush=True)
    t0 = time.perf_counter()
    client = LanguageClient("mellum-demo", "0")
    await client.start_io(sys.executable, "-m", "mellum.cli", "lsp", "--model", str(model), "--no-telemetry")
    await client.initialize_async(types.InitializeParams(
        capabilities=types.ClientCapabilities(), process_id=None, root_uri=project.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=project.as_uri(), name=project.name)],
        initialization_options={"maxNewTokens": max_new_tokens, "debounceMs": 0},
    ))
    client.initialized(types.InitializedParams())
    status = await client.protocol.send_request_async("mellum/status", {})
    while not status.ready and not status.loadError:
        await asyncio.sleep(0.1)
        status = await client.protocol.send_request_async("mellum/status", {})
    if status.loadError:
        print(f"mellum: error: {status.loadError}", file=sys.stderr)
        return 1
    print(s.dim(f"server ready in {time.perf_counter() - t0:.1f} s\n"))

    version = 0
    for spot in SPOTS:
        path = project / spot.path
        cut = _cut_file(project, spot)
        if cut is None:
            print(s.dim(f"skipped {spot.path}: no such file, or no line starting with {spot.line.strip()!r}\n"))
            continue
        text, line, column = cut
        uri = path.as_uri()
        version += 1
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, column),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))
        t = time.perf_counter()
        result = await client.text_document_inline_completion_async(params)
        rtt = (time.perf_counter() - t) * 1000
        status = await client.protocol.send_request_async("mellum/status", {})
        suggestion = result.items[0].insert_text if result and result.items else ""

        print(s.bold(f"{spot.path}:{line + 1}:{column + 1}") + s.dim(f"  ({spot.note})"))
        lines = text.split("\n")
        for context_line in lines[max(0, line - 3):line]:
            print(s.dim("  │ " + context_line))
        shown = suggestion.split("\n")
        print("  │ " + lines[line][:column] + s.green(shown[0]) + s.dim("█"))
        for more in shown[1:]:
            print("  │ " + s.green(more))
        if not suggestion:
            print(s.dim("  │ (no suggestion)"))
        last = getattr(status, "last", None)
        detail = ""
        if last is not None:
            tm = last.timingsMs
            detail = (f"server {last.latencyMs:.0f} ms = context {getattr(tm, 'context', 0):.0f} + prefill "
                      f"{getattr(tm, 'prefill', 0):.0f} + decode {getattr(tm, 'decode', 0):.0f} ms; "
                      f"{last.promptTokens} prompt tokens ({last.cachedTokens} cached), "
                      f"{last.generatedTokens} generated, stop: {last.stopReason}")
        print(s.dim(f"  ⏱ round trip {rtt:.0f} ms" + (f"; {detail}" if detail else "")))

        # Type the suggestion's first two characters: the server answers from its suggestion cache.
        if len(suggestion) > 2 and "\n" not in suggestion[:2]:
            typed = suggestion[:2]
            version += 1
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(line, column), types.Position(line, column)), text=typed)]))
            params.position = types.Position(line, column + len(typed))
            t = time.perf_counter()
            again = await client.text_document_inline_completion_async(params)
            rest = again.items[0].insert_text if again and again.items else ""
            print(s.dim(f"  ⌨ typed {typed!r} → rest {rest[:30]!r} from the suggestion cache in "
                        f"{(time.perf_counter() - t) * 1000:.1f} ms"))
        client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))
        print()

    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    print("Connect your editor to the same server: `mellum lsp` (stdio) — see docs/editors.md for Neovim,")
    print("VS Code and other LSP clients; `mellum serve` for the HTTP API (docs/serving.md).")
    return 0
