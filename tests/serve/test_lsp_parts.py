"""Pieces of the language server and the runner, in-process: suggestion cache, settings, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mellum.serve.lsp import LspConfig, SuggestionCache
from mellum.serve.runner import Cancelled, Runner


def test_cache_answers_while_typing_through_a_suggestion():
    cache = SuggestionCache(entries=4, tail_chars=50)
    text = "def f(x):\n    \nprint(f(1))\n"
    at = text.index("    \n") + 4
    cache.put("u", text, at, "id1", "return x + 1")
    assert cache.lookup("u", text, at) == ("id1", "return x + 1")
    typed = text[:at] + "ret" + text[at:]
    assert cache.lookup("u", typed, at + 3) == ("id1", "urn x + 1")
    # Typing something else, typing all of it, another document, or a changed suffix: no answer.
    assert cache.lookup("u", text[:at] + "rex" + text[at:], at + 3) is None
    done = text[:at] + "return x + 1" + text[at:]
    assert cache.lookup("u", done, at + len("return x + 1")) is None
    assert cache.lookup("v", typed, at + 3) is None
    assert cache.lookup("u", typed[: at + 3] + ")" + typed[at + 3:], at + 3) is None
    # An edit before the suggestion's start (same length, so offsets still line up) invalidates it.
    assert cache.lookup("u", typed.replace("def f", "def g"), at + 3) is None


def test_cache_is_bounded_lru():
    cache = SuggestionCache(entries=2, tail_chars=10)
    for i in range(3):
        cache.put("u", "x" * 10, i, f"id{i}", "abc")
    assert cache.lookup("u", "x" * 10, 0) is None  # evicted
    assert cache.lookup("u", "x" * 10, 2) == ("id2", "abc")


def test_settings_merge_camel_case_and_ignore_junk():
    cfg = LspConfig().merged({"maxNewTokens": "12", "debounce_ms": 5, "multiline": "never", "bogus": 1,
                              "temperature": "hot", "deadlineMs": 100})
    assert (cfg.max_new_tokens, cfg.debounce_ms, cfg.multiline, cfg.deadline_ms) == (12, 5.0, "never", 100.0)
    assert cfg.temperature == 0.0  # "hot" ignored with a warning
    assert LspConfig().merged({"multiline": "sometimes"}).multiline == "auto"
    assert LspConfig().merged(None) == LspConfig()


def test_settings_out_of_range_are_ignored():
    # Each of these, in force, would make every completion fail (or use an empty prefix) without a word.
    bad = {"maxNewTokens": -5, "temperature": -1, "maxPrefixChars": -10, "maxSuffixChars": 1e400, "deadlineMs": 0,
           "debounceMs": float("nan"), "projectContext": "false"}
    assert LspConfig().merged(bad) == LspConfig()
    assert LspConfig().merged({"debounceMs": 600_000}).debounce_ms == 75.0  # ten minutes: as if it never answered
    assert LspConfig().merged({"debounceMs": 10_000}).debounce_ms == 10_000.0
    good = LspConfig().merged({"maxNewTokens": 1, "temperature": 0.5, "maxPrefixChars": 0, "projectContext": False})
    assert (good.max_new_tokens, good.temperature, good.max_prefix_chars, good.project_context) == (1, 0.5, 0, False)


def test_runner_cancel_before_start_never_reaches_the_engine(tiny_service):
    runner = Runner(tiny_service)
    from mellum.complete import CompletionRequest

    cancel = threading.Event()
    cancel.set()

    async def go():
        return await runner.complete(CompletionRequest(path="a.py", prefix="x = "), cancel, "test", "test")

    with pytest.raises(Cancelled):
        asyncio.run(go())
    assert runner.metrics.cancelled.get(endpoint="test") == 1 and runner.queue_depth == 0
    runner.close()


def test_runner_task_cancellation_sets_the_engine_event(tiny_service):
    from mellum.complete import CompletionRequest

    runner = Runner(tiny_service)
    cancel = threading.Event()
    long = CompletionRequest(path="a.py", prefix="def f():\n", max_new_tokens=400, multiline=True)

    async def go():
        task = asyncio.ensure_future(runner.complete(long, cancel, "test", "test"))
        while runner.queue_depth == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cancel.is_set()  # the engine sees it at its next token
        # The worker frees itself: the next request is served.
        done = await runner.complete(CompletionRequest(path="a.py", prefix="y = ", max_new_tokens=2),
                                     threading.Event(), "test", "test")
        return done

    served = asyncio.run(go())
    assert served.completion.generated_tokens <= 2
    runner.close()


def test_lsp_telemetry_sent_again_is_recorded_once(tiny_service, tmp_path):
    """`mellum/telemetry` sent again (a client retrying a request that timed out) and `mellum.accepted` run twice
    for one completion store and count each event once; the reply says how many were already on record."""
    from mellum.serve.lsp import create_server
    from mellum.serve.telemetry import TelemetryStore

    with TelemetryStore(tmp_path / "t.db") as store:
        server = create_server(service=tiny_service, telemetry=store)
        telemetry = server.protocol.fm.features["mellum/telemetry"]
        accepted = server.protocol.fm.commands["mellum.accepted"]
        batch = {"events": [{"id": "c1", "event": "shown"}, {"id": "c1", "event": "partial", "acceptedText": "a +"}]}
        assert telemetry(batch) == {"recorded": 2}
        assert telemetry(batch) == {"recorded": 2, "duplicates": 2}
        accepted("c1")
        accepted("c1")
        shown = [{"id": "c2", "event": "shown", "eventId": "e1"}, {"id": "c2", "event": "shown", "eventId": "e2"}]
        assert telemetry({"events": shown}) == {"recorded": 2}
        assert telemetry(shown[0]) == {"recorded": 1, "duplicates": 1}
        with pytest.raises(Exception, match="eventId"):
            telemetry({"id": "c2", "event": "shown", "eventId": 7})
        assert store.counts() == {"completions": 0, "shown": 3, "partial": 1, "accepted": 1}
        assert server.mellum.metrics.telemetry.get(event="shown") == 3
        assert server.mellum.metrics.telemetry.get(event="accepted") == 1
        server.mellum.runner.close()


def test_lsp_telemetry_without_a_store_records_nothing(tiny_service):
    """With telemetry off (`--no-telemetry`) events are answered as not recorded, not as duplicates."""
    from mellum.serve.lsp import create_server

    server = create_server(service=tiny_service, telemetry=None)
    telemetry = server.protocol.fm.features["mellum/telemetry"]
    assert telemetry({"id": "c1", "event": "shown"}) == {"recorded": 0}
    server.mellum.runner.close()


class _Release:
    """An engine call that ignores its cancel event until the test releases it (a long prefill has no token
    boundary to stop at), and says when it started."""

    def __init__(self):
        self.started, self.release, self.ran = threading.Event(), threading.Event(), 0

    def __call__(self, cancel):
        self.ran += 1
        self.started.set()
        assert self.release.wait(10)
        return "done"


async def _until(check, timeout_s=5.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_queue_depth_counts_a_cancelled_call_until_the_worker_lets_go():
    """A caller that stops waiting does not free the engine: the queue depth (and its gauge) counts the call until
    the worker is done with it. A call cancelled while it waits in the queue leaves it at once."""

    async def main():
        runner = Runner(service=None)
        running, queued = _Release(), _Release()
        cancel_running, cancel_queued = threading.Event(), threading.Event()
        first = asyncio.ensure_future(runner.call(running, cancel_running, cancel=cancel_running, endpoint="e"))
        second = asyncio.ensure_future(runner.call(queued, cancel_queued, cancel=cancel_queued, endpoint="e"))
        await asyncio.get_running_loop().run_in_executor(None, running.started.wait, 5)
        assert runner.queue_depth == 2
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert runner.queue_depth == 1  # left the queue without waiting for the worker
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert cancel_running.is_set()
        assert runner.queue_depth == 1 and runner.metrics.queue_depth.get() == 1  # still on the worker
        running.release.set()
        await _until(lambda: runner.queue_depth == 0)
        assert runner.metrics.queue_depth.get() == 0 and runner.metrics.cancelled.get(endpoint="e") == 2
        assert queued.ran == 0  # never reached the engine
        # An ordinary call is out of the count by the time its caller has the answer.
        free = _Release()
        free.release.set()
        assert await runner.call(free, threading.Event(), cancel=threading.Event(), endpoint="e") == "done"
        assert runner.queue_depth == 0
        runner.close()

    asyncio.run(main())


def test_queue_depth_counts_a_closed_stream_until_the_worker_lets_go():
    from types import SimpleNamespace

    release = threading.Event()

    class Service:
        def stream(self, request, cancel):
            yield "a"
            assert release.wait(10)  # deaf to `cancel` for a while
            yield "b"
            return SimpleNamespace(text="ab", prompt_tokens=1, cached_tokens=0, generated_tokens=2)

    async def main():
        runner = Runner(Service())
        request = SimpleNamespace(return_prompt=False)
        release.set()
        whole = [p async for p in runner.stream(request, threading.Event(), "e", "test", "c0")]
        assert whole == ["a", "b"] and runner.queue_depth == 0  # a finished stream: the worker is free
        release.clear()
        cancel = threading.Event()
        pieces = runner.stream(request, cancel, "e", "test", "c1")
        assert await pieces.__anext__() == "a"
        await pieces.aclose()  # the client went away
        assert cancel.is_set() and runner.queue_depth == 1  # the worker is still in the engine
        release.set()
        await _until(lambda: runner.queue_depth == 0)
        # A stream closed while it waits behind another never starts, and leaves the queue at once.
        release.clear()
        busy = asyncio.ensure_future(runner.call(lambda: release.wait(10), cancel=threading.Event(), endpoint="e"))
        await _until(lambda: runner.queue_depth == 1)
        waiting = runner.stream(request, threading.Event(), "e", "test", "c2")
        first = asyncio.ensure_future(waiting.__anext__())
        await _until(lambda: runner.queue_depth == 2)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert runner.queue_depth == 1
        release.set()
        await busy
        assert runner.queue_depth == 0
        runner.close()

    asyncio.run(main())
