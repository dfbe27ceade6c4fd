"""The remote backend: the engine interface over any OpenAI-compatible `/v1/completions` server (vLLM,
llama.cpp server, ...), for users who serve the model at scale.

Prompts travel as token-id arrays (the completions API accepts them), so the server sees exactly the prompt
the native engine would. Generated ids come back as `token_ids` (vLLM, with `return_token_ids`), `tokens`
(llama.cpp's native endpoint, with `return_tokens`) or the ids of `logprobs.content` (llama-server's
`/v1/completions`, which streams special tokens such as `<filename>` as empty text, and one id per streamed piece:
where `encode` is given, pieces with text are re-encoded, since a character split over tokens arrives as one piece
under its last id); for servers that return only text, pass `encode` (text → ids), which the completion service
takes from its tokenizer — the engine itself never imports one. Sampling knobs are sent explicitly (`top_k` -1 =
off, which vLLM and llama.cpp both read so; `min_p` 0), since llama-server's defaults (top-k 40, min-p 0.05) would
otherwise narrow sampled distributions. Streaming (SSE) gives `on_token`, cancellation, deadlines and `max_lines`
on the client side. Each constrained token (token healing: `allowed_first_ids`, `allowed_next`) is a one-token
request with `logit_bias`, then the rest is one request.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Callable, Sequence

from mellum.engine.api import GenerationResult
from mellum.engine.sampling import SamplingParams, token_ids


def completions_url(url: str) -> str:
    """The `/v1/completions` endpoint of a server given by its root (`http://host:8000`), its OpenAI base URL
    (`.../v1`, as OpenAI clients take it) or the endpoint itself."""
    url = url.rstrip("/")
    if url.endswith("/v1/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


class BackendError(ConnectionError):
    """The remote server failed the request: an error status or error event, a malformed or cut-off stream. A
    ConnectionError, as an unreachable server is: the backend did not deliver, and the message says what it sent
    (the CLI prints it without a traceback, `mellum serve` answers 502)."""


class BackendBusy(BackendError):
    """The remote server refused the request for load (429, or 503 with a Retry-After): no failure, a request to
    come back later, which `mellum serve` passes on to its own client as a 429 with the same Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _said(body: bytes) -> str:
    """What an error response says, in one line: the message of an OpenAI-style `{"error": {"message"}}` (or a
    FastAPI `detail`), else the body's text, cut at 300 characters."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        if message is None and "detail" in data:
            message = data["detail"] if isinstance(data["detail"], str) else json.dumps(data["detail"])
        if message:
            text = str(message)
    text = " ".join(text.split())
    return (text[:300] + "…" if len(text) > 300 else text) or "(empty body)"


def _retry_after(value: str | None) -> int:
    """Seconds from a Retry-After header (a number of seconds; an HTTP date or nothing reads as 1)."""
    try:
        return max(1, min(3600, int(float(value))))
    except (TypeError, ValueError, OverflowError):
        return 1


# OpenAI's logit_bias accepts values in [-100, 100]; +100 makes the listed tokens the only likely ones.
_FORCE_BIAS = 100


def _hang_up(sockets: list) -> None:
    """Shut down the response's socket: the reader blocked in `recv` wakes at once (closing the socket from another
    thread would not wake it), and the server sees the client go, so it stops generating for a cancelled request
    instead of at its next token or after `timeout_s`. The connection is not reused after this."""
    import socket

    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the reader
            pass


class OpenAIEngine:
    """`generate` against `base_url` (e.g. http://localhost:8000/v1) serving `model`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, newline_ids: Sequence[int] = (),
                 encode: Callable[[str], list[int]] | None = None, timeout_s: float = 60.0, vocab_size: int | None = None):
        import httpx  # the `serve` extra

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = completions_url(base_url)
        self.model, self.encode, self.vocab_size = model, encode, vocab_size
        self.newline_ids = frozenset(int(i) for i in newline_ids)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client, self._timeout_s = httpx.Client(headers=headers, timeout=timeout_s), timeout_s

    def close(self) -> None:
        self._client.close()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None = None,
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        prompt = token_ids(prompt_ids, "prompt")
        if not prompt:
            raise ValueError("the prompt is empty: at least one token id is needed to generate from")
        if self.vocab_size is not None:
            if bad := [i for i in prompt if not 0 <= i < self.vocab_size]:
                raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            params.validate_ids(self.vocab_size)
        if params.max_lines is not None and not self.newline_ids:
            raise ValueError("max_lines needs the ids whose text holds a newline: build the engine with newline_ids")
        t0 = time.perf_counter()
        deadline = t0 + params.deadline_s if params.deadline_s is not None else None
        tokens: list[int] = []
        state = {"lines": 0, "first": None}

        def take(token: int) -> str | None:  # returns a stop reason or None
            if state["first"] is None:
                state["first"] = time.perf_counter()
            if token in params.stop_ids:
                return "stop"
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in self.newline_ids:
                state["lines"] += 1
                if params.max_lines is not None and state["lines"] >= params.max_lines:
                    return "lines"
            return "length" if len(tokens) >= params.max_new_tokens else None

        reason = None
        # Constrained tokens (token healing) one request each, the allowed ids forced through `logit_bias`.
        while reason is None and (allowed := params.allowed_ids(tuple(tokens))) is not None:
            before = len(tokens)
            reason = self._stream(prompt + tokens, params, 1, {str(i): _FORCE_BIAS for i in allowed}, take, cancel,
                                  deadline)
            if reason == "length" and before < len(tokens) < params.max_new_tokens:
                reason = None  # the one token came: on to the next (a server that sent none ends the request)
        if reason is None:
            reason = self._stream(prompt + tokens, params, params.max_new_tokens - len(tokens), None, take, cancel,
                                  deadline)
        end = time.perf_counter()
        first = state["first"] or end
        timings = {"first_token": (first - t0) * 1e3, "decode": (end - first) * 1e3, "total": (end - t0) * 1e3}
        return GenerationResult(tokens=tokens, stop_reason=reason, prompt_tokens=len(prompt), timings_ms=timings)

    def _stream(self, prompt, params, max_tokens, logit_bias, take, cancel, deadline) -> str:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k or -1, "min_p": 0.0, "stream": True,
                "return_token_ids": True, "return_tokens": True, "logprobs": 1}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop_ids:
            body["stop_token_ids"] = list(params.stop_ids)
        if logit_bias:
            body["logit_bias"] = logit_bias
        # The response is read on a helper thread: a server that says nothing for a while (queued, prefilling a long
        # prompt) must not hold a request the editor cancelled or whose deadline passed until `timeout_s`.
        pieces: queue.Queue = queue.Queue()
        done, sockets, ended = threading.Event(), [], False
        threading.Thread(target=self._read, args=(body, pieces, done, sockets), name="mellum-remote",
                         daemon=True).start()
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    return "cancelled"
                if deadline is not None and time.perf_counter() >= deadline:
                    return "deadline"
                try:
                    kind, value = pieces.get(timeout=0.02)
                except queue.Empty:
                    continue
                ended = kind in ("error", "end")
                if kind == "error":
                    raise value
                if kind == "end":
                    return value
                for token in value:
                    if (reason := take(token)) is not None:
                        return reason
        finally:
            done.set()
            if not ended:  # cancelled, past the deadline, or stopped here while the server still generates
                _hang_up(sockets)

    def _read(self, body, pieces: queue.Queue, done: threading.Event, sockets: list) -> None:
        """Stream one response into `pieces`: ("ids", [...]) per chunk, then ("end", reason) or ("error", exc).
        The connection's socket goes into `sockets`, for the caller to hang up on when it stops listening."""
        import httpx

        try:
            with self._client.stream("POST", self.url, json=body) as response:
                stream = response.extensions.get("network_stream")
                if stream is not None and (sock := stream.get_extra_info("socket")) is not None:
                    sockets.append(sock)
                    if done.is_set():  # the caller stopped before the socket was known
                        _hang_up(sockets)
                busy = response.status_code == 429 or response.status_code == 503 and "retry-after" in response.headers
                if busy:
                    raise BackendBusy(f"{self.url} is busy (it answered {response.status_code}): "
                                      f"{_said(response.read())}", _retry_after(response.headers.get("retry-after")))
                if response.status_code != 200:
                    raise BackendError(f"{self.url} answered {response.status_code}: {_said(response.read())}")
                for line in response.iter_lines():
                    if done.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        pieces.put(("end", "stop"))
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise BackendError(f"{self.url} streamed a line that is not JSON: {data[:200]!r}") from None
                    # vLLM and llama-server report a failure after the 200 as an error object in the stream.
                    if not isinstance(chunk, dict) or chunk.get("error") is not None or chunk.get("object") == "error":
                        raise BackendError(f"{self.url} failed mid-stream: {data[:500]}")
                    choice = (chunk.get("choices") or [{}])[0]
                    pieces.put(("ids", self._ids(choice, chunk)))
                    if choice.get("finish_reason") is not None:
                        pieces.put(("end", "length" if choice["finish_reason"] == "length" else "stop"))
                        return
            raise BackendError(f"the stream from {self.url} ended without a finish_reason or [DONE]: the answer was "
                               "cut off (or the server does not stream)")
        except httpx.TransportError as exc:  # refused, unreachable, dropped, silent: say where, without a traceback
            silent = isinstance(exc, httpx.ReadTimeout)
            why = (f"the backend at {self.url} sent nothing for {self._timeout_s} s" if silent
                   else f"cannot reach the backend at {self.url}: {exc}")
            error = ConnectionError(why)
            error.__cause__ = exc
            pieces.put(("error", error))
        except Exception as exc:  # noqa: BLE001 - raised on the caller's thread
            pieces.put(("error", exc))

    def _ids(self, choice: dict, chunk: dict) -> list[int]:
        for key in ("token_ids", "tokens"):
            ids = choice.get(key, chunk.get(key))
            if ids and all(isinstance(i, int) for i in ids):
                return ids
        text = choice.get("text") or ""
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        ids = [c.get("id") for c in content or [] if isinstance(c, dict)]
        # llama-server lists one id per streamed piece, and a character split over several tokens is one piece
        # under its last token's id: text is re-encoded when there is text, ids are taken for empty pieces (special
        # tokens such as <filename>, streamed as "").
        if ids and all(isinstance(i, int) for i in ids) and (not text or self.encode is None):
            return ids
        if not text:
            return []
        if self.encode is None:
            raise RuntimeError("the server returned text without token ids; pass encode= (the tokenizer's encode)")
        return self.encode(text)
