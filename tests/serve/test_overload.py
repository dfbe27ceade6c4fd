"""Load shedding (`--max-queue`): with the engine's queue full, a request is refused at once (HTTP 429 with
Retry-After, an empty LSP answer) and counted, and the server serves again once the queue drains. Real servers over
real sockets: uvicorn and pygls in a thread with the tiny model behind a gate, and `mellum serve` / `mellum lsp` as
subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mellum.serve.runner import Runner
from tests.ports import free_port

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


class _Gated:
    """The tiny model's service with a gate in front of `complete`: the engine stays busy (deaf to cancellation,
    like a long prefill) until the test opens it."""

    def __init__(self, service):
        self.service, self.entered, self.gate, self.calls = service, threading.Event(), threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.service, name)

    def complete(self, request, cancel=None):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(60)
        return self.service.complete(request, cancel=cancel)


@contextlib.contextmanager
def _uvicorn(app):
    """The app served by uvicorn on a free port in a thread: its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _series(text: str) -> dict[str, float]:
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if not name.startswith("#")}


def test_http_answers_429_with_retry_after_beyond_max_queue_and_serves_again_once_it_drains(tiny_service):
    import httpx
    import openai  # the dev extra

    from mellum.serve.http import HttpConfig, create_app

    gated = _Gated(tiny_service)
    app = create_app(gated, HttpConfig(model_name="tiny", max_queue=1))
    fim = {"path": "a.py", "prefix": "def f():\n    return ", "options": {"max_tokens": 4}}
    completion = {"prompt": "x = ", "max_tokens": 4}
    with _uvicorn(app) as base, httpx.Client(base_url=base, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(http.post, "/v1/fim", json=fim)  # holds the engine (the only place in the queue)
        assert gated.entered.wait(30)
        health = http.get("/health").json()  # not an engine call: answered while the engine is busy
        assert health["queue_depth"] == 1 and health["max_queue"] == 1
        refused = [
            http.post("/v1/completions", json=completion),
            http.post("/v1/completions", json={**completion, "stream": True}),  # refused before any event
            http.post("/v1/fim", json=fim),
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ]
        for r in refused:
            assert r.status_code == 429, r.text
            assert r.headers["content-type"] == "application/json" and int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "server_overloaded"
            assert "--max-queue" in error["message"]
        # OpenAI's client reads it as a rate limit (which it retries after Retry-After).
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="overloaded"):
            client.completions.create(model="tiny", prompt="x = ", max_tokens=2)
        metrics = _series(http.get("/metrics").text)
        assert metrics['mellum_requests_total{endpoint="/v1/completions",status="429"}'] == 3
        assert metrics['mellum_requests_total{endpoint="/v1/fim",status="429"}'] == 1
        assert metrics['mellum_overloaded_total{endpoint="/v1/completions"}'] == 3
        assert metrics['mellum_overloaded_total{endpoint="/v1/chat/completions"}'] == 1
        assert metrics["mellum_queue_limit"] == 1 and metrics["mellum_queue_depth"] == 1
        assert gated.calls == 1  # the refused requests never reached the service
        gated.gate.set()
        assert busy.result(60).status_code == 200
        for body in (completion, {**completion, "stream": True}):  # the queue has drained: served again
            assert http.post("/v1/completions", json=body).status_code == 200
        assert http.post("/v1/fim", json=fim).status_code == 200
        metrics = _series(http.get("/metrics").text)
        assert metrics['mellum_overloaded_total{endpoint="/v1/completions"}'] == 3
        assert metrics["mellum_queue_depth"] == 0


def test_a_cancelled_call_waiting_in_the_queue_takes_no_place_but_a_running_one_does():
    """A superseded LSP request (its event set, its caller still waiting) stays in the pool's queue until a worker
    drops it, at no cost: it must not refuse the newer request that replaced it. A cancelled call still on the
    worker does hold its place: the engine is busy until it reaches its next token."""
    from mellum.serve.runner import Cancelled, Overloaded

    class Gate:
        def __init__(self):
            self.entered, self.open = threading.Event(), threading.Event()

        def __call__(self, cancel):
            self.entered.set()
            assert self.open.wait(10)
            return "done"

    async def main():
        runner = Runner(service=None, max_queue=2)
        running, events = Gate(), [threading.Event() for _ in range(3)]
        first = asyncio.ensure_future(runner.call(running, events[0], cancel=events[0], endpoint="e"))
        await asyncio.get_running_loop().run_in_executor(None, running.entered.wait, 5)
        second = asyncio.ensure_future(runner.call(running, events[1], cancel=events[1], endpoint="e"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="2 completion requests are queued or running") as refused:
            await runner.call(running, threading.Event(), cancel=threading.Event(), endpoint="e")
        assert refused.value.retry_after_s >= 1
        events[1].set()  # superseded: still in the pool's queue, no longer work for the engine
        third = asyncio.ensure_future(runner.call(running, events[2], cancel=events[2], endpoint="e"))
        await asyncio.sleep(0)
        assert runner.queue_depth == 3
        events[0].set()  # cancelled on the worker, which has not let go of it yet
        with pytest.raises(Overloaded):
            await runner.call(running, threading.Event(), cancel=threading.Event(), endpoint="e")
        assert runner.metrics.overloaded.get(endpoint="e") == 2
        running.open.set()
        assert await first == "done" and await third == "done"
        with pytest.raises(Cancelled):  # dropped by the worker, never run
            await second
        assert runner.queue_depth == 0
        runner.close()
        unlimited = Runner(service=None, max_queue=0)
        assert unlimited.max_queue == 0 and unlimited.metrics.queue_limit.get() == 0
        unlimited.close()

    asyncio.run(main())


def test_lsp_answers_an_overloaded_completion_with_an_empty_result_not_an_error(tiny_service):
    """An error reply would be a popup in the editor on every keystroke: the refused request gets an empty list (the
    menu's marked incomplete, so the next keystroke asks again), counted in the metrics and `mellum/status`."""
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    from mellum.serve.lsp import create_server

    gated = _Gated(tiny_service)
    server = create_server(service=gated, max_queue=1)
    port = free_port()
    thread = threading.Thread(target=server.start_tcp, args=("127.0.0.1", port), daemon=True)
    thread.start()
    text = "def f():\n    "

    def inline(uri):
        return types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(1, 4),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked))

    async def session():
        client = LanguageClient("overload-test", "0")
        for _ in range(100):
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities(), process_id=None))
        client.initialized(types.InitializedParams())
        for uri in ("untitled:A", "untitled:B"):
            client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=1, text=text)))
        busy = asyncio.ensure_future(client.text_document_inline_completion_async(inline("untitled:A")))
        assert await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 30)
        refused = await asyncio.wait_for(client.text_document_inline_completion_async(inline("untitled:B")), 10)
        menu = await asyncio.wait_for(client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri="untitled:B"), position=types.Position(1, 4))), 10)
        status = await client.protocol.send_request_async("mellum/status", {})
        gated.gate.set()
        served = await asyncio.wait_for(busy, 60)
        again = await asyncio.wait_for(client.text_document_inline_completion_async(inline("untitled:B")), 60)
        await client.shutdown_async(None)
        client.protocol.writer.close()  # not `exit`, which would end this (the test's) process
        await asyncio.wait_for(client.stop(), 10)
        return refused, menu, status, served, again

    try:
        refused, menu, status, served, again = asyncio.run(asyncio.wait_for(session(), 120))
        thread.join(10)
        assert not thread.is_alive()  # the server ended with the connection
    finally:
        gated.gate.set()
        server.mellum.close()
    assert len(refused.items) == 0 and len(menu.items) == 0 and menu.is_incomplete
    assert (status.overloaded, status.maxQueue, status.queueDepth) == (2, 1, 1)
    assert server.mellum.metrics.overloaded.get(endpoint="lsp/inline") == 1
    assert server.mellum.metrics.overloaded.get(endpoint="lsp/completion") == 1
    assert len(served.items) == 1 and len(again.items) == 1  # the queue drained: B is served


@pytest.mark.parametrize("command", ["serve", "lsp"])
@pytest.mark.parametrize("argv", [["--max-queue", "-1"], ["--workers", "2", "--max-queue", "1"]])
def test_max_queue_below_the_workers_is_refused_before_loading(command, argv, capsys):
    from mellum.cli import main

    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mellum: error: --max-queue must be 0 (no limit) or at least --workers")
    assert "loading" not in err
    with pytest.raises(ValueError, match="max_queue must be 0"):
        Runner(service=None, max_queue=-1)


def test_the_servers_take_max_queue_from_the_command_line(tiny_model_dir, tmp_path):
    """`mellum serve --max-queue` reaches the runner (/health, /metrics), its default is 4 per worker, and
    `mellum lsp --max-queue` reaches the language server's (`mellum/status`)."""
    import httpx
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    from tests.e2e.conftest import serve_process, server_env

    def health(*args) -> dict:
        with serve_process(["--model", str(tiny_model_dir), "--no-telemetry", *args], tmp_path / "serve.log",
                           90) as (_, base):
            answer = httpx.get(f"{base}/health", timeout=5).json()
            return {**answer, "metric": _series(httpx.get(f"{base}/metrics", timeout=5).text)["mellum_queue_limit"]}

    flagged = health("--max-queue", "3")
    assert flagged["max_queue"] == 3 and flagged["metric"] == 3
    assert health("--workers", "2")["max_queue"] == 8

    async def lsp_status():
        client = LanguageClient("max-queue-test", "0")
        await client.start_io(sys.executable, "-m", "mellum.cli", "lsp", "--model", str(tiny_model_dir),
                              "--no-telemetry", "--max-queue", "0", env=server_env())
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities(), process_id=None))
        client.initialized(types.InitializedParams())
        status = await client.protocol.send_request_async("mellum/status", {})
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        return status

    status = asyncio.run(asyncio.wait_for(lsp_status(), 90))
    assert status.maxQueue == 0 and status.overloaded == 0
