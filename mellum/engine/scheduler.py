"""Continuous batching: one background thread admits requests into free cache rows between decode steps, runs
chunked prefills and batched decode steps, and frees a row as soon as its request stops, is cancelled or runs
past its deadline.

The scheduler owns policy (who runs next, when a slot frees); the runner (`NativeEngine`) owns the model work:
`start(seq)`, `prefill_chunk(seq)`, `decode_step(seqs)`, `speculative_step(seq)`. One prefill chunk runs per
iteration, interleaved with decode steps of the running batch, so a long new prompt does not stall the others
(chunked prefill in the manner of Sarathi-Serve, Agrawal et al. 2024).
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from typing import Callable

import torch

from mellum.engine.api import GenerationResult
from mellum.engine.sampling import SamplingParams

_ids = itertools.count(1)


class Sequence:
    """The state of one request while it runs: its cache row, tokens, RNG, stop bookkeeping and timings."""

    def __init__(self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None,
                 on_token: Callable[[int], None] | None, newline_ids: frozenset[int], max_len: int):
        self.id = next(_ids)
        self.prompt, self.params, self.cancel, self.on_token = prompt, params, cancel, on_token
        self.newline_ids, self.max_len = newline_ids, max_len
        self.tokens: list[int] = list(prompt)  # prompt + generated; the last one may still lack KV
        self.generated: list[int] = []
        self.row = -1
        self.filled = 0  # positions [0, filled) have KV in the row
        self.cached = 0  # prompt tokens served from the prefix cache
        self.prefilling = True
        self.lines = 0
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.generator: torch.Generator | None = None
        self.draft_tokens = self.accepted_tokens = 0
        self.state: dict = {}  # runner-private (drafter, MTP draft, ...)
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + params.deadline_s if params.deadline_s is not None else None
        self.t_start = self.t_first = self.t_end = None
        self.prefill_s = 0.0
        self.done = threading.Event()
        self._constrained = params.allowed_next is not None or params.allowed_first_ids is not None
        self._allowed: tuple[int, tuple[int, ...] | None] = (-1, None)  # (len(generated), ids) of the last answer

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def allowed_ids(self) -> tuple[int, ...] | None:
        """The ids the next token must be one of (token healing), or None; asked once per position, and never
        again after the first None."""
        if not self._constrained:
            return None
        n = len(self.generated)
        if self._allowed[0] != n:
            self._allowed = (n, self.params.allowed_ids(tuple(self.generated)))
            self._constrained = self._allowed[1] is not None
        return self._allowed[1]

    def emit(self, token: int) -> bool:
        """Record one generated token (streaming it); return True when the request must stop here."""
        if self.finished:
            return True
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.params.stop_ids:
            self.stop_reason = "stop"
            return True
        self.tokens.append(token)
        self.generated.append(token)
        if self.on_token is not None:
            self.on_token(token)
        if token in self.newline_ids:
            self.lines += 1
            if self.params.max_lines is not None and self.lines >= self.params.max_lines:
                self.stop_reason = "lines"
                return True
        if len(self.generated) >= self.params.max_new_tokens:
            self.stop_reason = "length"
        elif len(self.tokens) >= self.max_len:
            self.stop_reason = "context"
        return self.finished

    def result(self) -> GenerationResult:
        end = self.t_end or time.perf_counter()
        start = self.t_start or end
        first = self.t_first or end
        ms = 1000.0
        timings = {
            "queue": (start - self.t_submit) * ms,
            "prefill": self.prefill_s * ms,
            "first_token": (first - self.t_submit) * ms,
            "decode": max(0.0, end - first) * ms,
            "total": (end - self.t_submit) * ms,
        }
        return GenerationResult(tokens=list(self.generated), stop_reason=self.stop_reason or "error",
                                prompt_tokens=len(self.prompt), cached_tokens=self.cached, timings_ms=timings,
                                draft_tokens=self.draft_tokens, accepted_tokens=self.accepted_tokens)


class Scheduler:
    """Runs sequences on `runner` with at most `max_batch` at once, in a daemon thread started on first use."""

    def __init__(self, runner, max_batch: int, speculative: bool):
        self.runner, self.max_batch, self.speculative = runner, max_batch, speculative
        self.waiting: deque[Sequence] = deque()
        self.active: dict[int, Sequence] = {}  # row → sequence
        self.free_rows = list(range(max_batch))
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def busy_slots(self) -> int:
        return len(self.active)

    def submit(self, seq: Sequence) -> Sequence:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mellum-engine", daemon=True)
                self._thread.start()
            self._cv.notify()
        return seq

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the loop -------------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str | None = None) -> None:
        if reason is not None and not seq.finished:
            seq.stop_reason = reason
        seq.t_end = time.perf_counter()
        if seq.row >= 0:
            self.active.pop(seq.row, None)
            self.free_rows.append(seq.row)
            self.free_rows.sort()  # keep the batch's rows low and contiguous when possible (cheap cache views)
            seq.row = -1
        seq.done.set()

    def _expired(self, seq: Sequence, now: float) -> str | None:
        if seq.cancel is not None and seq.cancel.is_set():
            return "cancelled"
        if seq.deadline is not None and now >= seq.deadline:
            return "deadline"
        return None

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self.waiting and not self.active:
                        self._cv.wait()
                    if self._closed:
                        for seq in list(self.waiting) + list(self.active.values()):
                            self._finish(seq, "cancelled")
                        self.waiting.clear()
                        return
                    now = time.perf_counter()
                    for seq in [s for s in self.waiting if self._expired(s, now)]:  # cancelled while queued
                        self.waiting.remove(seq)
                        self._finish(seq, self._expired(seq, now))
                    admitted = []
                    while self.waiting and self.free_rows:
                        seq = self.waiting.popleft()
                        if (reason := self._expired(seq, time.perf_counter())) is not None:
                            self._finish(seq, reason)
                            continue
                        seq.row = self.free_rows.pop(0)
                        self.active[seq.row] = seq
                        admitted.append(seq)
                try:
                    self._iterate(admitted)
                except BaseException as exc:  # a failing step fails its batch, never the engine thread
                    traceback.print_exc()
                    for seq in list(self.active.values()):
                        seq.error = exc
                        self._finish(seq, "error")

    def _iterate(self, admitted: list[Sequence]) -> None:
        for seq in admitted:
            seq.t_start = time.perf_counter()
            self._guard(seq, self.runner.start)
        now = time.perf_counter()
        for seq in list(self.active.values()):
            if (reason := self._expired(seq, now)) is not None or seq.finished:
                self._finish(seq, reason)
        prefilling = [s for s in self.active.values() if s.prefilling]
        if prefilling:
            seq = min(prefilling, key=lambda s: s.id)  # first come, first served
            self._guard(seq, self.runner.prefill_chunk)
        decoding = [s for s in self.active.values() if not s.prefilling and not s.finished]
        if len(decoding) == 1 and not prefilling and self.speculative:
            self._guard(decoding[0], self.runner.speculative_step)
        elif len(decoding) == 1:  # a failure of one request's step (its callbacks included) is its own
            self._guard(decoding[0], lambda seq: self.runner.decode_step([seq]))
        elif decoding:
            decoding.sort(key=lambda s: s.row)
            self.runner.decode_step(decoding)
        for seq in list(self.active.values()):
            if seq.finished:
                self._finish(seq)

    def _guard(self, seq: Sequence, step) -> None:
        try:
            step(seq)
        except Exception as exc:  # noqa: BLE001 - reported to the request's caller
            seq.error = exc
            self._finish(seq, "error")
