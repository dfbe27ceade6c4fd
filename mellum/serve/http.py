"""HTTP completion API: a FastAPI app over the completion service (OpenAI-compatible and native FIM endpoints).

Routes: `POST /v1/completions` (OpenAI text completions: prompt = code before the cursor, suffix = code after;
SSE streaming), `POST /v1/fim` (native: file path, prefix, suffix, project root, extra context pieces like
Tabby's segments, options; returns the completion id, timings and optionally the exact prompt),
`POST /v1/chat/completions` (chat template from the tokenizer config), `POST /v1/telemetry`, `GET /health`,
`GET /metrics` (Prometheus). Handlers stay thin: they validate, build a `CompletionRequest`, and hand it to
the `Runner`. Errors are JSON in the OpenAI shape `{"error": {"message", "type", "code"}}`. With the engine's
queue full (`HttpConfig.max_queue`) the completion routes answer 429 with a `Retry-After` header at once.
"""


import asyncio
import hmac
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from mellum.serve.documents import scrub
from mellum.serve.metrics import Metrics
from mellum.serve.runner import Cancelled, Overloaded, Runner, is_secret

API_KEY_ENV = "MELLUM_API_KEY"
MAX_PIECES = 256  # open_files entries, and extra_context pieces, one /v1/fim request may carry
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts: beyond it generation fails
# OpenAI fields this server cannot honour, each with the values that mean "not used". Anything else is refused
# with a 400: answering as if the field were absent gives the client something other than what it asked for
# (echo=true expects the prompt in front of the text, logprobs a filled `logprobs` object, tools a tool call).
UNSUPPORTED_COMPLETIONS = {"echo": (None, False), "logprobs": (None,), "best_of": (None, 1),
                           "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}
UNSUPPORTED_CHAT = {"logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
                    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                    "functions": (None, []), "response_format": (None, {"type": "text"})}


@dataclass
class HttpConfig:
    """Server settings; every limit is a field here, not a literal in a handler."""

    host: str = "127.0.0.1"  # loopback by default: exposing a model to the network is an explicit choice
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 2048  # the largest max_tokens a client may ask for
    default_max_tokens: int = 64  # /v1/fim and chat when the client does not say
    workspaces: tuple[str, ...] = ()  # project roots clients may name; context is never read outside them
    model_name: str = "mellum"
    disconnect_poll_s: float = 0.05
    open_paths: tuple[str, ...] = field(default=("/health",))  # reachable without the key
    # Completion requests queued or running on the engine beyond which more are refused with 429 (load shedding);
    # None: runner.QUEUE_PER_WORKER per engine worker; 0: no limit.
    max_queue: int | None = None


# ---- request and response bodies ------------------------------------------------------------------------
def _models():
    """Pydantic models, built lazily so that importing this module does not require the `serve` extra."""
    from pydantic import BaseModel, ConfigDict, Field

    class Lenient(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, n=1, ...)

    class StreamOptions(Lenient):
        include_usage: bool = False

    class CompletionsBody(Lenient):
        model: str | None = None
        prompt: Union[str, list[str]] = Field("", description="Code before the cursor (a one-element list is accepted)")
        suffix: str | None = Field(None, description="Code after the cursor")
        max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16")
        temperature: float | None = Field(None, ge=0, le=2, description="Default 0 (greedy), unlike OpenAI's 1")
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1, le=1)
        stream: bool = False
        stop: Union[str, list[str], None] = None
        seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
        path: str | None = Field(None, description="mellum extension: the file being completed (for the prompt)")
        stream_options: StreamOptions | None = Field(None, description="include_usage: a last chunk with the usage")
        # Declared to be refused when used (UNSUPPORTED_COMPLETIONS), not to be ignored.
        echo: bool | None = None
        logprobs: int | None = None
        best_of: int | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        logit_bias: dict[str, float] | None = None

    class ContextPiece(Lenient):
        path: str = Field(..., min_length=1, max_length=4096)
        text: str

    class FimOptions(Lenient):
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(0.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)
        seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
        multiline: bool | None = None
        stop: list[str] = Field(default_factory=list, max_length=16)
        deadline_ms: float | None = Field(None, gt=0)
        return_prompt: bool = False

    class FimBody(Lenient):
        path: str = Field(..., min_length=1, max_length=4096, description="Path of the file being completed")
        prefix: str
        suffix: str = ""
        project_root: str | None = Field(None, description="A workspace the server was started with (--workspace)")
        # Bounded counts (MAX_PIECES): every open buffer is synced into the project index on the engine's worker, so
        # 200k tiny entries (3.5 MB, under the body limit) held the worker 38 s while other requests waited.
        extra_context: list[ContextPiece] = Field(default_factory=list, max_length=MAX_PIECES,
                                                  description="Snippets/files, most relevant last")
        open_files: dict[str, str] = Field(default_factory=dict, max_length=MAX_PIECES,
                                           description="Unsaved buffers: path -> text")
        options: FimOptions = Field(default_factory=FimOptions)

    class Usage(BaseModel):
        prompt_tokens: int = 0
        cached_tokens: int = 0
        generated_tokens: int = 0

    class FimResponse(BaseModel):
        id: str
        completion: str
        stop_reason: str
        timings_ms: dict[str, float]
        usage: Usage
        prompt: str | None = None

    class ChatMessage(Lenient):
        role: Literal["system", "user", "assistant", "tool"]
        content: str

    class ChatBody(Lenient):
        model: str | None = None
        messages: list[ChatMessage] = Field(..., min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1, le=1)
        stop: Union[str, list[str], None] = None
        seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
        stream: Literal[False] = False
        # Declared to be refused when used (UNSUPPORTED_CHAT), not to be ignored.
        logprobs: bool | None = None
        top_logprobs: int | None = None
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        logit_bias: dict[str, float] | None = None
        tools: list[dict] | None = None
        functions: list[dict] | None = None
        response_format: dict | None = None

    class TelemetryEventBody(Lenient):
        id: str = Field(..., min_length=1, max_length=256, description="The completion id from a response")
        event: Literal["shown", "accepted", "partial", "rejected", "ignored"]
        accepted_text: str | None = Field(None, description="For 'partial': the part that was kept")
        replacement: str | None = Field(None, description="What the developer wrote instead, if known")
        event_id: str | None = Field(None, min_length=1, max_length=256,
                                     description="The client's id for this event, the same when it sends it again")

    class TelemetryBody(Lenient):
        events: list[TelemetryEventBody] = Field(..., min_length=1, max_length=1000)

    return dict(
        CompletionsBody=CompletionsBody, FimBody=FimBody, FimResponse=FimResponse, ChatBody=ChatBody,
        TelemetryBody=TelemetryBody, TelemetryEventBody=TelemetryEventBody, Usage=Usage,
    )


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def _error_body(message: str, type_: str, code: str | None, param: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}, **extra}


def _refuse_unsupported(body, unused: dict[str, tuple]) -> None:
    for name, accepted in unused.items():
        value = getattr(body, name)
        if value not in accepted:
            raise ApiError(400, f"{name}={json.dumps(value)[:200]} is not supported by this server; leave it out",
                           code="unsupported_parameter", param=name)


# ---- middleware: auth and body size ---------------------------------------------------------------------
class _Guard:
    """ASGI middleware: bearer-token check and request body limit, before any route parses anything."""

    def __init__(self, app, config: HttpConfig, count=None):
        self.app, self.config = app, config
        self.count = count or (lambda path, status: None)  # refusals here never reach the app's handlers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.config.api_key and scope.get("path") not in self.config.open_paths:
            token = headers.get("authorization", "")
            scheme, _, value = token.partition(" ")
            # Compared as the bytes the client sent (decoded as latin-1 above) and timing-safe; a key with non-ASCII
            # characters arrives UTF-8 encoded.
            sent, key = value.strip().encode("latin-1"), self.config.api_key.encode()
            if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key):
                self.count(scope.get("path", ""), 401)
                return await _send_json(
                    send, 401, _error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                           "authentication_error", "invalid_api_key"),
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # a compressed body would otherwise be "error parsing the body" (400)
            self.count(scope.get("path", ""), 415)
            return await _send_json(send, 415, _error_body(
                f"Content-Encoding {encoding!r} is not supported: send the request body uncompressed",
                "invalid_request_error", "unsupported_content_encoding"))
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                self.count(scope.get("path", ""), 413)
                return await _send_json(send, 413, _too_large(limit))
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        # Chunked upload without a length: read it here, up to the limit, then replay it to the app.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                self.count(scope.get("path", ""), 413)
                return await _send_json(send, 413, _too_large(limit))
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> dict:
    return _error_body(f"request body larger than the server's limit of {limit} bytes", "invalid_request_error",
                       "request_too_large")


async def _send_json(send, status: int, body: dict, extra_headers=()):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": data})


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(service, config: HttpConfig | None = None, telemetry=None, metrics: Metrics | None = None,
               workers: int = 1):
    """Build the FastAPI app around a loaded `CompletionService` (and an optional `TelemetryStore`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from mellum import __version__
    from mellum.complete import CompletionRequest
    from mellum.engine.openai import BackendBusy
    from mellum.prompt import ContextFile
    from mellum.serve.telemetry import TelemetryEvent, recorded_reply

    config = config or HttpConfig()
    m = _models()
    runner = Runner(service, metrics, telemetry, workers=workers, model_name=config.model_name,
                    max_queue=config.max_queue)
    workspaces = [Path(w).resolve() for w in config.workspaces]
    started = time.time()

    app = FastAPI(
        title="mellum",
        version=__version__,
        description="Code completion with fill-in-the-middle models: OpenAI-compatible and native FIM endpoints.",
    )
    app.state.runner = runner

    def _endpoint(path: str) -> str:
        # The label is the route (`/v1/models/{model:path}`), never the URL a client chose: a label per URL would
        # let any client grow /metrics (and the server's memory) without bound.
        for route in app.routes:
            if getattr(route, "path_regex", None) is not None and route.path_regex.match(path):
                return route.path
        return "other"

    def _count(request_or_path, status) -> None:
        path = request_or_path if isinstance(request_or_path, str) else request_or_path.url.path
        runner.metrics.record(runner.metrics.requests.inc, endpoint=_endpoint(path), status=str(status))

    app.add_middleware(_Guard, config=config, count=_count)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        _count(request, exc.status)
        return JSONResponse(_error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {e.get('msg')}")
        _count(request, 422)
        # Keep FastAPI's `detail` for schema conformance; NaN and Infinity (which Python's JSON parser accepts
        # in a body) are echoed as strings, since a JSON response cannot hold them.
        detail = json.loads(json.dumps(errors, default=str), parse_constant=str)
        return JSONResponse(_error_body("invalid request: " + "; ".join(parts), "invalid_request_error",
                                        "invalid_request", detail=detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        _count(request, exc.status_code)
        return JSONResponse(_error_body(str(exc.detail), "invalid_request_error", None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        _count(request, 500)
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None),
                            status_code=500)

    def _request(**fields) -> CompletionRequest:
        try:
            return CompletionRequest(**fields)
        except ValueError as exc:  # the service validates too: its message is for the client
            raise ApiError(400, str(exc)) from None

    def _max_tokens(value: int | None, default: int) -> int:
        value = default if value is None else value
        if value > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {value} exceeds this server's limit of {config.max_tokens_limit}")
        return value

    def _project_root(root: str | None) -> str | None:
        # Security: a client may only name a workspace the server was started with (or a folder inside one);
        # the context index then never reads outside that root.
        if root is None:
            return None
        try:
            resolved = Path(scrub(root)).resolve()
        except (OSError, ValueError) as exc:  # embedded NUL bytes, symlink loops
            raise ApiError(400, f"project_root {root!r} is not a usable path: {exc}") from None
        for w in workspaces:
            if resolved == w or w in resolved.parents:
                if not resolved.is_dir():
                    raise ApiError(400, f"project_root {root!r} is not a directory")
                return str(resolved)
        raise ApiError(403, f"project_root {root!r} is outside the server's workspaces; start the server with "
                            "--workspace DIR to allow it", "permission_error", "project_root_forbidden")

    def _stops(stop) -> list[str]:
        stops = [scrub(s) for s in ([stop] if isinstance(stop, str) else list(stop or []))]
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, "stop must be at most 16 non-empty strings")
        return stops

    async def _watch(http_request: Request, work, cancel: threading.Event):
        """Await the engine work while watching the connection: a client that hangs up cancels it."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=config.disconnect_poll_s)
                if done:
                    return task.result()
                if await http_request.is_disconnected():
                    cancel.set()
                    task.cancel()
                    await asyncio.wait({task})  # unwound before the caller closes what it ran (a stream's generator)
                    if not task.cancelled():
                        task.exception()  # retrieved: the 499 is the answer
                    raise ApiError(499, "client closed the request", "cancelled", "client_closed")
        except Cancelled:
            raise ApiError(499, "request cancelled", "cancelled", "cancelled") from None
        except Overloaded as exc:  # refused before queueing: OpenAI's clients retry a 429 after Retry-After
            raise ApiError(429, str(exc), "server_error", "server_overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except ValueError as exc:  # the service's user-facing errors (bad path, too long, ...)
            raise ApiError(400, str(exc)) from None
        except BackendBusy as exc:  # --backend-url: the server generating for us is full; our client may come back
            raise ApiError(429, str(exc), "server_error", "backend_overloaded",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except ConnectionError as exc:  # --backend-url: the server generating for us is unreachable or failed
            raise ApiError(502, str(exc), "server_error", "backend_error") from None
        finally:
            if not task.done():
                task.cancel()

    async def _run(http_request: Request, request, endpoint: str):
        cancel = threading.Event()
        served = await _watch(http_request, runner.complete(request, cancel, endpoint, source="http"), cancel)
        return served.completion

    def _ok(endpoint: str):
        runner.metrics.record(runner.metrics.requests.inc, endpoint=endpoint, status="200")

    @app.get("/health", summary="Liveness and the loaded model")
    async def health():
        return {"status": "ok", "model": config.model_name, "version": __version__,
                "uptime_s": round(time.time() - started, 3), "queue_depth": runner.queue_depth,
                "max_queue": runner.max_queue}

    def _model_card():
        return {"id": config.model_name, "object": "model", "created": int(started), "owned_by": "mellum"}

    @app.get("/v1/models", summary="OpenAI-compatible list of the served model (clients probe it before completing)")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}", summary="OpenAI-compatible description of one model")
    async def model_route(model: str):
        if model != config.model_name:
            raise ApiError(404, f"no model {model!r} here: this server serves {config.model_name!r}", "not_found",
                           "model_not_found")
        return _model_card()

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics_route():
        return PlainTextResponse(runner.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", summary="OpenAI-compatible text completion (prompt = prefix, suffix = suffix)")
    async def completions(body: m["CompletionsBody"], http_request: Request):
        _refuse_unsupported(body, UNSUPPORTED_COMPLETIONS)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt as a list must hold exactly one string (n=1 only)")
            prompt = prompt[0]
        request = _request(
            path=scrub(body.path or "untitled"), prefix=scrub(prompt), suffix=scrub(body.suffix or ""),
            max_new_tokens=_max_tokens(body.max_tokens, 16), temperature=body.temperature or 0.0,
            top_p=body.top_p, seed=body.seed, stop=_stops(body.stop),
        )
        created = int(time.time())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return await _streamed(http_request, request, created, body.model, usage)
        completion = await _run(http_request, request, "/v1/completions")
        _ok("/v1/completions")
        return {
            "id": completion.id, "object": "text_completion", "created": created,
            "model": body.model or config.model_name,
            "choices": [{"text": completion.text, "index": 0, "logprobs": None,
                         "finish_reason": _finish_reason(completion.stop_reason)}],
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.generated_tokens,
                      "total_tokens": completion.prompt_tokens + completion.generated_tokens},
        }

    async def _streamed(http_request: Request, request, created: int, model: str | None, usage: bool):
        """The SSE response, its headers sent once the first piece is there: a request the service refuses (a prompt
        too long for the window, ...) is the same 4xx as without streaming, not a 200 carrying an error event."""
        cid = uuid.uuid4().hex
        cancel = threading.Event()
        final: dict = {}  # the runner puts the service's Completion here once the stream has ended
        pieces = runner.stream(request, cancel, "/v1/completions", "http", cid, final)

        async def first_piece():
            try:
                return await pieces.__anext__()
            except StopAsyncIteration:  # nothing generated
                return None

        try:
            first = await _watch(http_request, first_piece(), cancel)
        except ApiError:
            cancel.set()
            await pieces.aclose()
            raise
        return StreamingResponse(_sse(pieces, first, cid, cancel, final, created, model, usage),
                                 media_type="text/event-stream")

    async def _sse(pieces, first: str | None, cid: str, cancel: threading.Event, final: dict, created: int,
                   model: str | None, usage: bool):
        def chunk(text: str | None, finish: str | None, tokens: dict | None = None) -> str:
            data = {"id": cid, "object": "text_completion", "created": created, "model": model or config.model_name,
                    "choices": [] if text is None else [{"text": text, "index": 0, "logprobs": None,
                                                         "finish_reason": finish}]}
            if usage:  # OpenAI's stream_options.include_usage: null on every chunk, filled on one last chunk
                data["usage"] = tokens
            return f"data: {json.dumps(data)}\n\n"

        try:
            if first is not None:
                yield chunk(first, None)
                async for piece in pieces:
                    yield chunk(piece, None)
            completion = final.get("completion")
            yield chunk("", _finish_reason(completion.stop_reason if completion is not None else "stop"))
            if usage and completion is not None:
                yield chunk(None, None, {"prompt_tokens": completion.prompt_tokens,
                                         "completion_tokens": completion.generated_tokens,
                                         "total_tokens": completion.prompt_tokens + completion.generated_tokens})
            _ok("/v1/completions")
        except (Cancelled, ValueError) as exc:
            yield f"data: {json.dumps(_error_body(str(exc) or 'cancelled', 'invalid_request_error', None))}\n\n"
        except ConnectionError as exc:  # --backend-url failed mid-answer: say so before [DONE]
            yield f"data: {json.dumps(_error_body(str(exc), 'server_error', 'backend_error'))}\n\n"
        finally:
            cancel.set()
        yield "data: [DONE]\n\n"

    @app.post("/v1/fim", response_model=m["FimResponse"], response_model_exclude_none=True,
              summary="Native fill-in-the-middle completion with project context")
    async def fim(body: m["FimBody"], http_request: Request):
        o = body.options
        request = _request(
            path=scrub(body.path), prefix=scrub(body.prefix), suffix=scrub(body.suffix),
            project_root=_project_root(body.project_root),
            # The API takes pieces most relevant last (the order of the prompt); the service most relevant first.
            extra_context=[ContextFile(scrub(p.path), scrub(p.text)) for p in reversed(body.extra_context)
                           if not is_secret(p.path, p.text)],
            open_files={scrub(k): scrub(v) for k, v in body.open_files.items() if not is_secret(k, v)},
            max_new_tokens=_max_tokens(o.max_tokens, config.default_max_tokens), temperature=o.temperature,
            top_p=o.top_p, top_k=o.top_k, seed=o.seed, multiline=o.multiline, stop=_stops(o.stop),
            deadline_ms=o.deadline_ms, return_prompt=o.return_prompt,
        )
        completion = await _run(http_request, request, "/v1/fim")
        _ok("/v1/fim")
        return {
            "id": completion.id, "completion": completion.text, "stop_reason": str(completion.stop_reason),
            "timings_ms": {k: float(v) for k, v in (completion.timings_ms or {}).items()},
            "usage": {"prompt_tokens": completion.prompt_tokens, "cached_tokens": completion.cached_tokens,
                      "generated_tokens": completion.generated_tokens},
            "prompt": completion.prompt if o.return_prompt else None,
        }

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat (chat template from the tokenizer config)")
    async def chat(body: m["ChatBody"], http_request: Request):
        _refuse_unsupported(body, UNSUPPORTED_CHAT)
        messages = [{"role": x.role, "content": scrub(x.content)} for x in body.messages]
        max_tokens = _max_tokens(body.max_tokens, config.default_max_tokens)
        cancel = threading.Event()
        work = runner.call(chat_sync, service, messages, max_tokens, body.temperature or 0.0, body.top_p, body.seed,
                           _stops(body.stop), cancel, cancel=cancel, endpoint="/v1/chat/completions")
        text, prompt_tokens, generated, reason = await _watch(http_request, work, cancel)
        _ok("/v1/chat/completions")
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": body.model or config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish_reason(reason)}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated},
        }

    @app.post("/v1/telemetry", summary="Record what the developer did with completions (durable on 200)")
    async def telemetry_route(body: Union[m["TelemetryBody"], m["TelemetryEventBody"]]):
        if runner.telemetry is None:
            raise ApiError(404, "telemetry is disabled on this server (started with --no-telemetry)",
                           "not_found", "telemetry_disabled")
        items = body.events if hasattr(body, "events") else [body]
        events = [TelemetryEvent(scrub(e.id), e.event, e.accepted_text, e.replacement, client="http",
                                 event_id=e.event_id) for e in items]
        # Committed (fsync'd WAL) before we answer: an acknowledged event survives a crash.
        try:
            stored = await asyncio.get_running_loop().run_in_executor(None, runner.telemetry.record_events, events)
        except sqlite3.OperationalError as exc:  # locked by another process past the busy timeout, disk full, ...
            raise ApiError(503, f"telemetry not recorded ({exc}); send the events again later", "server_error",
                           "telemetry_unavailable") from None
        for e in stored:
            runner.metrics.record(runner.metrics.telemetry.inc, event=e.event)
        _ok("/v1/telemetry")
        return recorded_reply(events, stored)

    return app


def _finish_reason(stop_reason) -> str:
    return "length" if str(stop_reason) in ("length", "max_tokens", "max_new_tokens") else "stop"


def chat_sync(service, messages, max_tokens, temperature, top_p, seed, stops, cancel):
    """Render the chat template from the tokenizer config, generate on the engine, cut at stop strings."""
    from mellum.engine import SamplingParams

    tokenizer = service.tokenizer
    template = tokenizer.config.get("chat_template")
    if not template:
        raise ValueError("this model's tokenizer has no chat_template: use /v1/completions or /v1/fim")
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ids = tokenizer.encode_segments(_chat_segments(env.from_string(template), messages, tokenizer))
    stop_ids = [i for t in ("<|im_end|>", "<|endoftext|>") if (i := tokenizer.token_to_id(t)) is not None]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop_ids=stop_ids)
    result = service.engine.generate(ids, params, cancel=cancel)
    tokens = [t for t in result.tokens if t not in stop_ids]
    text = tokenizer.decode(tokens)
    for s in stops:
        if s in text:
            text, result.stop_reason = text[: text.index(s)], "stop"
    return text, len(ids), len(result.tokens), result.stop_reason


_MARK = re.compile("\ue000([0-9]+)\ue001")  # private-use characters around a message's index


def _chat_segments(template, messages: list[dict], tokenizer) -> list[tuple[str, str]]:
    """The rendered chat prompt as ("literal", template text) / ("text", message content) segments: the template's
    control tokens (`<|im_start|>`) stay tokens, while the same strings typed in a message stay text, as a FIM prompt
    keeps `<fim_prefix>` inside code text. The template renders once with marks in place of the contents; where it
    transforms contents (the marked rendering, filled in, is not the real one), a content holding a control token
    is refused instead."""
    options = {"add_generation_prompt": True, "bos_token": "", "eos_token": tokenizer.config.get("eos_token", "")}
    rendered = template.render(messages=messages, **options)
    marked = [{**message, "content": f"\ue000{i}\ue001"} for i, message in enumerate(messages)]
    parts = _MARK.split(template.render(messages=marked, **options))
    # split() alternates: template text, a message's index, template text, ...
    segments = [("text", messages[int(part)]["content"]) if i % 2 else ("literal", part)
                for i, part in enumerate(parts) if not i % 2 or int(part) < len(messages)]
    if "".join(text for _, text in segments) == rendered:
        return segments
    for message in messages:
        found = [t for t in tokenizer.special_tokens if t in message["content"]]
        if found:
            raise ValueError(f"a {message['role']} message holds the control token {found[0]!r}, which this "
                             "model's chat template would not keep as text")
    return [("literal", rendered)]


def run_server(app, config: HttpConfig) -> None:
    """Serve with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level=os.environ.get("MELLUM_LOG_LEVEL", "info"),
                timeout_graceful_shutdown=2)
