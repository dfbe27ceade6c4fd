"""Completion runner: the bridge from async protocol handlers (HTTP, LSP) to the blocking completion service.

Calls run on a small thread pool (the engine is compute-bound; one worker by default keeps requests from
fighting over two CPU cores). Each call carries a `threading.Event`: when the client goes away, the LSP
client cancels, or a newer keystroke supersedes the request, the event is set and the engine stops at its next
token. A request cancelled while still queued never reaches the engine. Admission is bounded (`max_queue`): a
call that would wait behind too many others is refused at once (`Overloaded`: HTTP 429, an empty LSP answer)
rather than answered after the developer has typed on. The runner also keeps the metrics and writes served
completions to the telemetry store, so both servers record the same facts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator

from mellum.serve.metrics import Metrics

log = logging.getLogger(__name__)

# The default admission limit (`--max-queue`): engine calls queued or running per worker thread. On CPU a completion
# holds a worker for a few hundred ms, so the last one admitted starts within about a second, while a suggestion
# can still be useful; a longer queue only answers keystrokes the developer has typed past.
QUEUE_PER_WORKER = 4


def is_secret(path: str, text: str | None = None) -> bool:
    """Credentials-looking files (.env, keys, by name or content) never go into a prompt, whoever sends them.

    The project index applies the same rule to files on disk; this covers what clients send themselves.
    """
    from mellum.context.ignore import is_secret as check

    return check(path, text)


class Cancelled(Exception):
    """The request was cancelled (client gone, $/cancelRequest, or superseded by a newer request)."""


class Overloaded(Exception):
    """Refused before queueing: `max_queue` engine calls are already queued or running."""

    def __init__(self, pending: int, max_queue: int, retry_after_s: int):
        super().__init__(f"the server is overloaded: {pending} completion requests are queued or running (limit "
                         f"{max_queue}, --max-queue); try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Call:
    """One engine call between its submission and the moment a worker lets go of it."""

    cancel: threading.Event
    started: bool = False
    held_s: float | None = None  # how long it held the worker, when it ran to the end uncancelled

    @property
    def pending(self) -> bool:
        """Work the engine still has to do: running, or queued and not cancelled. A superseded LSP request stays in
        the pool's queue until a worker drops it, which costs nothing: it does not take a newer request's place."""
        return self.started or not self.cancel.is_set()


@dataclass
class Served:
    """What a protocol handler needs back: the service's Completion plus the end-to-end latency."""

    completion: object  # mellum.complete.Completion
    latency_ms: float


class Runner:
    def __init__(self, service, metrics: Metrics | None = None, telemetry=None, workers: int = 1, model_name: str = "",
                 max_queue: int | None = None):
        """`max_queue`: the most engine calls queued or running at once; more are refused with `Overloaded`.
        None: QUEUE_PER_WORKER per worker; 0: no limit."""
        max_queue = QUEUE_PER_WORKER * workers if max_queue is None else max_queue
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 (no limit) or more, got {max_queue}")
        self.service = service
        self.metrics = metrics or Metrics()
        self.telemetry = telemetry
        self.model_name = model_name
        self.workers, self.max_queue = workers, max_queue
        self.metrics.record(self.metrics.queue_limit.set, max_queue)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mellum-engine")
        self._calls: set[_Call] = set()
        self._held_s = 0.0  # moving average of how long a call holds a worker: the Retry-After estimate
        self._depth_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return len(self._calls)

    @property
    def retry_after_s(self) -> int:
        """Whole seconds until a place in the queue is likely to free up: a call's usual time on a worker."""
        return max(1, math.ceil(self._held_s / self.workers))

    def _leave(self, call: _Call) -> None:
        with self._depth_lock:
            self._calls.discard(call)
            if call.held_s is not None:
                self._held_s = 0.8 * self._held_s + 0.2 * call.held_s if self._held_s else call.held_s
            self.metrics.record(self.metrics.queue_depth.set, len(self._calls))

    def _submit(self, fn, cancel: threading.Event, endpoint: str) -> Future:
        """Queue `fn` on the workers, counted in the queue depth until a worker lets go of it (it returned or raised,
        however long after its caller stopped waiting) or it leaves the queue unstarted (cancelled). Raises
        `Overloaded` instead when `max_queue` calls are pending already."""
        call = _Call(cancel)
        with self._depth_lock:
            pending = sum(c.pending for c in self._calls)
            if self.max_queue and pending >= self.max_queue:
                self.metrics.record(self.metrics.overloaded.inc, endpoint=endpoint)
                raise Overloaded(pending, self.max_queue, self.retry_after_s)
            self._calls.add(call)
            self.metrics.record(self.metrics.queue_depth.set, len(self._calls))

        def run():
            call.started = True
            start = time.perf_counter()
            result = fn()
            if not cancel.is_set():
                call.held_s = time.perf_counter() - start
            return result

        try:
            work = self._pool.submit(run)
        except BaseException:  # the pool is shut down
            self._leave(call)
            raise
        # Runs on the worker as `fn` ends (or where the work is cancelled), before anyone awaiting it wakes up.
        work.add_done_callback(lambda _: self._leave(call))
        return work

    # ---- one completion ------------------------------------------------------------------------------
    def complete_sync(self, request, cancel: threading.Event) -> object:
        """Run the service on the calling thread (a worker); raises Cancelled when cancelled."""
        if cancel.is_set():
            raise Cancelled()
        # The prompt is always asked for when telemetry is on: it is what a DPO pair is built from.
        wanted = request.return_prompt
        if self.telemetry is not None and not wanted:
            request = replace(request, return_prompt=True)
        completion = self.service.complete(request, cancel=cancel)
        if cancel.is_set():
            raise Cancelled()
        return completion, wanted

    async def complete(self, request, cancel: threading.Event, endpoint: str, source: str) -> Served:
        """Complete on a worker thread; asyncio cancellation of the caller sets `cancel` for the engine."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        completion, wanted = await self.call(self.complete_sync, request, cancel, cancel=cancel, endpoint=endpoint)
        latency_ms = (time.perf_counter() - start) * 1000
        self._observe(completion, endpoint, latency_ms)
        prompt = getattr(completion, "prompt", None)
        if self.telemetry is not None:
            await loop.run_in_executor(None, self._record_safely, request, completion.id, completion.text, prompt,
                                       completion, source, latency_ms)
        if not wanted and prompt is not None:
            completion = replace(completion, prompt=None)
        return Served(completion, latency_ms)

    async def call(self, fn, *args, cancel: threading.Event, endpoint: str):
        """Run a blocking engine call (`fn(*args)`, which watches `cancel`) on the workers, counted in the queue
        depth, or raise `Overloaded` at once when the queue is full; cancelling the caller sets `cancel` (the engine
        stops at its next token, the worker frees itself), a call cancelled while queued never starts, and either way
        the cancellation is counted.

        The queue depth counts the call until the worker is done with it: a caller that stops waiting does not free
        the engine, which may take a while to reach its next token. A call cancelled while queued leaves at once."""

        def guarded():
            if cancel.is_set():
                raise Cancelled()
            return fn(*args)

        work = self._submit(guarded, cancel, endpoint)
        future = asyncio.wrap_future(work, loop=asyncio.get_running_loop())
        # A caller cancelled while the call runs (or waits) no longer awaits it: its exception (Cancelled) is
        # retrieved here, or asyncio logs "Future exception was never retrieved" with a traceback for each one.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            work.cancel()  # only a call still queued can be: it leaves the queue now instead of when a worker is free
            self.metrics.record(self.metrics.cancelled.inc, endpoint=endpoint)
            raise
        except Cancelled:
            self.metrics.record(self.metrics.cancelled.inc, endpoint=endpoint)
            raise

    # ---- streaming -----------------------------------------------------------------------------------
    async def stream(
        self, request, cancel: threading.Event, endpoint: str, source: str, completion_id: str,
        final: dict | None = None,
    ) -> AsyncIterator[str]:
        """Yield text pieces as the engine produces them; closing the iterator cancels the engine.

        The service streams text only, so the caller names the completion (`completion_id`) for telemetry;
        once the stream has ended, `final["completion"]` holds the service's Completion (its stop reason). The
        first step raises `Overloaded` when the queue is full.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        start = time.perf_counter()
        final = {} if final is None else final

        def produce():
            try:
                if cancel.is_set():
                    raise Cancelled()
                if self.telemetry is not None and not request.return_prompt:
                    req = replace(request, return_prompt=True)
                else:
                    req = request
                pieces = self.service.stream(req, cancel=cancel)
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as finished:  # the service returns the final Completion
                        final["completion"] = finished.value
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                    if cancel.is_set():
                        pieces.close()
                        break
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        pieces: list[str] = []
        work = self._submit(produce, cancel, endpoint)  # counted in the queue depth until `produce` returns
        try:
            while True:
                item = await queue.get()
                if item is done or isinstance(item, BaseException):
                    # That was produce's last item: wait until it returns, so the stream ends with the worker free.
                    await asyncio.wrap_future(work, loop=loop)
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                pieces.append(item)
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            cancel.set()
            work.cancel()  # still queued: it leaves the queue now; running: the engine stops at its next token
            self.metrics.record(self.metrics.cancelled.inc, endpoint=endpoint)
            raise
        latency_ms = (time.perf_counter() - start) * 1000
        completion = final.get("completion")
        if completion is not None:
            self._observe(completion, endpoint, latency_ms)
        if self.telemetry is not None:
            prompt = getattr(completion, "prompt", None)
            await loop.run_in_executor(
                None, self._record_safely, request, completion_id, "".join(pieces), prompt, completion, source,
                latency_ms,
            )

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _observe(self, completion, endpoint: str, latency_ms: float) -> None:
        m = self.metrics
        m.record(m.latency.observe, latency_ms / 1000, endpoint=endpoint)
        m.record(m.prompt_tokens.inc, getattr(completion, "prompt_tokens", 0) or 0)
        m.record(m.cached_tokens.inc, getattr(completion, "cached_tokens", 0) or 0)
        m.record(m.generated_tokens.inc, getattr(completion, "generated_tokens", 0) or 0)

    def _record_safely(self, *args) -> None:
        """Record a served completion; a store that cannot take it (locked by another process past the busy timeout,
        disk full) loses this row, not the completion the developer is waiting for."""
        try:
            self._record(*args)
        except sqlite3.Error as exc:
            self.metrics.record(self.metrics.telemetry_errors.inc)
            log.warning("telemetry: completion %s not recorded: %s", args[1], exc)

    def _record(self, request, cid, text, prompt, completion, source, latency_ms) -> None:
        # Stored in prompt order (most relevant last), as `mellum.prompt` renders a context list.
        context = [{"path": f.path, "text": f.text} for f in reversed(request.extra_context or [])]
        self.telemetry.record_completion(
            cid,
            path=request.path,
            prefix=request.prefix,
            suffix=request.suffix,
            text=text,
            context=context,
            prompt=prompt,
            source=source,
            model=self.model_name,
            prompt_tokens=getattr(completion, "prompt_tokens", None),
            generated_tokens=getattr(completion, "generated_tokens", None),
            latency_ms=latency_ms,
            healed=getattr(completion, "healed", "") or "",
        )
