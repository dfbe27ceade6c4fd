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
