"""Serving soak and fuzz: simulated typists against the real servers, then malformed input; not a timed test.

    python benchmarks/serve_soak.py                      # HTTP and LSP soak (16 typists, 60 s each) + fuzz
    python benchmarks/serve_soak.py --mode http --seconds 20 --typists 8
    python benchmarks/serve_soak.py --mode fuzz --schemathesis

Soak: each typist picks a spot in a file of the sample project and types the file's own text there, one key
every 20-120 ms in bursts of 1-8 keys, then pauses 0.2-1 s to read the suggestion. Every keystroke asks for
a completion and the previous one is abandoned (HTTP: the connection is closed, so the server cancels; LSP:
the keystroke supersedes it, and 10% are cancelled explicitly with $/cancelRequest). Reported: requests,
answered, cancelled, shed (HTTP 429: the server's queue was full, `--max-queue`; the LSP answers those empty),
errors (any other 4xx or 5xx, transport error, or JSON-RPC error other than RequestCancelled),
p50/p90/p99 latency of answered requests, and the server's RSS sampled every second (first vs last 10 s).

Fuzz: malformed JSON-RPC (not JSON, not an object, invalid UTF-8, unknown methods, wrong types), bad
positions (negative, past the end, inside a surrogate pair), a 10 MB document, binary content; HTTP with
invalid JSON/UTF-8, lone surrogates, oversized bodies; after each case the server must still answer.
`--schemathesis` also runs schemathesis against the published OpenAPI schema (check: no 5xx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "examples" / "sample_project"
KEY = "soak-key"
CACHE_ARGS: list[str] = []  # --prefix-cache-mb passed through to the servers


# ---- setup --------------------------------------------------------------------------------------------------
def tiny_model(tmp: Path) -> Path:
    """A random tiny-dense model with a BPE trained on a few stdlib files (when no model is given or bundled)."""
    import sysconfig

    import torch

    import mellum
    from mellum.config import get_config
    from mellum.model import Transformer
    from mellum.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("argparse.py", "json/decoder.py", "textwrap.py", "dataclasses.py")]
    path = tmp / "tiny-model"
    torch.manual_seed(0)
    mellum.save_pretrained(Transformer(get_config("tiny-dense")).float(), path)
    train_bpe(texts, vocab_size=1024).save(path)
    return path


def pick_model(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    try:
        from mellum.assets import default_model_dir

        return default_model_dir()
    except FileNotFoundError:
        print("no bundled model: using a random tiny-dense model (latencies are the serving path, not a real model)")
        return tiny_model(tmp)


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files() -> list[tuple[str, str]]:
    return [(str(p.relative_to(PROJECT)), p.read_text()) for p in sorted(PROJECT.rglob("*.py"))]


class Stats:
    def __init__(self):
        self.requests = self.answered = self.cancelled = self.shed = self.errors = 0
        self.latencies: list[float] = []
        self.error_samples: list[str] = []
        self.rss: list[tuple[float, int]] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])

    def report(self, name: str, seconds: float) -> dict:
        lat = sorted(self.latencies)

        def q(p):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

        first = [r for t, r in self.rss if t <= 10]
        middle = [r for t, r in self.rss if abs(t - self.rss[-1][0] / 2) <= 5] if self.rss else []
        last = [r for t, r in self.rss if t >= self.rss[-1][0] - 10] if self.rss else []
        mb = 1024 * 1024
        out = {
            "mode": name, "seconds": round(seconds, 1), "requests": self.requests, "answered": self.answered,
            "cancelled": self.cancelled, "shed": self.shed, "errors": self.errors,
            "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
            "rss_first10s_mb": round(statistics.median(first) / mb, 1) if first else None,
            "rss_middle10s_mb": round(statistics.median(middle) / mb, 1) if middle else None,
            "rss_last10s_mb": round(statistics.median(last) / mb, 1) if last else None,
            "rss_max_mb": round(max(r for _, r in self.rss) / mb, 1) if self.rss else None,
        }
        print(json.dumps(out))
        for e in self.error_samples:
            print("  error:", e)
        return out


async def sample_rss(pid: int, stats: Stats, stop: float) -> None:
    import psutil

    proc, t0 = psutil.Process(pid), time.time()
    while time.time() < stop:
        try:
            rss = proc.memory_info().rss
            rss += sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            return
        stats.rss.append((time.time() - t0, rss))
        await asyncio.sleep(1.0)


def typing_plan(rng: random.Random, docs):
    """(path, text, offset, keys): a spot at a line start and the characters that follow it in the file."""
    path, text = rng.choice(docs)
    starts = [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
    offset = rng.choice(starts)
    keys = text[offset:offset + rng.randint(1, 8)]
    return path, text[:offset] + text[offset + len(keys):], offset, keys


# ---- HTTP soak ----------------------------------------------------------------------------------------------
def start_http(model: Path, tmp: Path, workers: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mellum.cli", "serve", "--model", str(model), "--port", str(port), "--api-key", KEY,
         "--telemetry", str(tmp / "soak.db"), "--workspace", str(PROJECT), "--workers", str(workers),
         *CACHE_ARGS],
        env=env(), stdout=open(tmp / "http.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"HTTP server did not start; see {tmp / 'http.log'}")


async def http_typist(i: int, client, stats: Stats, stop: float, max_new: int) -> None:
    import httpx

    rng, docs = random.Random(i), files()

    async def ask(path, prefix, suffix):
        t0 = time.perf_counter()
        stats.requests += 1
        try:
            r = await client.post("/v1/fim", json={"path": path, "prefix": prefix, "suffix": suffix,
                                                   "project_root": str(PROJECT),
                                                   "options": {"max_tokens": max_new}})
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        except httpx.HTTPError as exc:
            stats.error(f"transport: {exc!r}")
            return
        if r.status_code == 429:  # load shed: the server's queue was full, the editor asks again on the next key
            stats.shed += 1
            return
        if r.status_code >= 500 or (r.status_code >= 400 and r.status_code != 499):
            stats.error(f"{r.status_code}: {r.text}")
            return
        stats.answered += 1
        stats.latencies.append((time.perf_counter() - t0) * 1000)

    while time.time() < stop:
        path, text, offset, keys = typing_plan(rng, docs)
        inflight = None
        for k in range(len(keys)):
            if inflight is not None and not inflight.done():
                inflight.cancel()  # the next keystroke abandons the previous request
            prefix = text[:offset] + keys[:k + 1]
            inflight = asyncio.ensure_future(ask(path, prefix, text[offset:]))
            await asyncio.sleep(rng.uniform(0.02, 0.12))
        try:
            await asyncio.wait_for(asyncio.shield(inflight), timeout=30)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        await asyncio.sleep(rng.uniform(0.2, 1.0))


async def soak_http(model: Path, tmp: Path, typists: int, seconds: float, max_new: int, workers: int) -> dict:
    import httpx

    proc, base = start_http(model, tmp, workers)
    stats = Stats()
    try:
        limits = httpx.Limits(max_connections=typists * 10)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                     limits=limits) as client:
            t0 = time.time()
            stop = t0 + seconds
            await asyncio.gather(sample_rss(proc.pid, stats, stop),
                                 *(http_typist(i, client, stats, stop, max_new) for i in range(typists)))
            alive = (await client.get("/health")).status_code == 200
        if not alive:
            stats.error("server not healthy after the soak")
        return stats.report("http", time.time() - t0)
    finally:
        proc.terminate()
        proc.wait(15)


# ---- LSP soak -----------------------------------------------------------------------------------------------
async def start_lsp(model: Path, tmp: Path, options: dict):
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("soak", "0")
    await client.start_io(sys.executable, "-m", "mellum.cli", "lsp", "--model", str(model), "--telemetry",
                          str(tmp / "lsp.db"), "--log-file", str(tmp / "lsp.log"), *CACHE_ARGS, env=env())
    await client.initialize_async(types.InitializeParams(
        capabilities=types.ClientCapabilities(), process_id=None, root_uri=PROJECT.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=PROJECT.as_uri(), name="sample")],
        initialization_options=options))
    client.initialized(types.InitializedParams())
    while not (await client.protocol.send_request_async("mellum/status", {})).ready:
        await asyncio.sleep(0.2)
    return client


async def lsp_typist(i: int, client, stats: Stats, stop: float) -> None:
    from lsprotocol import types
    from pygls.exceptions import JsonRpcException

    from mellum.serve.documents import position_at

    rng, docs = random.Random(1000 + i), files()
    version = 0

    async def ask(uri, line, character, msg_id):
        t0 = time.perf_counter()
        stats.requests += 1
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
        future = client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=60)
        except JsonRpcException as exc:
            if exc.code == -32800:  # RequestCancelled
                stats.cancelled += 1
            else:
                stats.error(f"json-rpc {exc.code}: {exc}")
            return
        except asyncio.TimeoutError:
            stats.error("no answer in 60 s")
            return
        if result is not None and len(result.items):
            stats.answered += 1
            stats.latencies.append((time.perf_counter() - t0) * 1000)
        else:
            stats.cancelled += 1  # superseded by a later keystroke: an empty list

    while time.time() < stop:
        path, text, offset, keys = typing_plan(rng, docs)
        uri = f"file://{PROJECT}/__soak_{i}_{path.replace('/', '_')}"
        version += 1
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))
        pending = []
        for k, key in enumerate(keys):
            line, character = position_at(text, offset + k)
            version += 1
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(line, character), types.Position(line, character)), text=key)]))
            text = text[:offset + k] + key + text[offset + k:]
            line, character = position_at(text, offset + k + 1)
            msg_id = f"{i}-{version}"
            pending.append(asyncio.ensure_future(ask(uri, line, character, msg_id)))
            if rng.random() < 0.1:
                await asyncio.sleep(0.01)
                client.cancel_request(types.CancelParams(id=msg_id))
            await asyncio.sleep(rng.uniform(0.02, 0.12))
        await asyncio.gather(*pending)
        client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))
        await asyncio.sleep(rng.uniform(0.2, 1.0))


async def soak_lsp(model: Path, tmp: Path, typists: int, seconds: float, max_new: int) -> dict:
    client = await start_lsp(model, tmp, {"maxNewTokens": max_new, "debounceMs": 30})
    stats = Stats()
    t0 = time.time()
    stop = t0 + seconds
    await asyncio.gather(sample_rss(client._server.pid, stats, stop),
                         *(lsp_typist(i, client, stats, stop) for i in range(typists)))
    try:
        await asyncio.wait_for(client.protocol.send_request_async("mellum/status", {}), 30)
    except Exception as exc:
        stats.error(f"server not answering after the soak: {exc!r}")
    out = stats.report("lsp", time.time() - t0)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return out


# ---- fuzz ---------------------------------------------------------------------------------------------------
class RawLsp:
    """A stdio LSP connection that sends bytes exactly as given (the typed client refuses bad input)."""

    def __init__(self, proc):
        self.proc = proc
        self.buffer = b""

    @classmethod
    async def start(cls, model: Path, tmp: Path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mellum.cli", "lsp", "--model", str(model), "--no-telemetry", "--log-file",
            str(tmp / "fuzz-lsp.log"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env(),
            limit=64 * 1024 * 1024)
        return cls(proc)

    def send_bytes(self, body: bytes) -> None:
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send(self, message: dict) -> None:
        self.send_bytes(json.dumps(message).encode())

    async def read(self) -> dict:
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
                if len(rest) >= length:
                    self.buffer = rest[length:]
                    return json.loads(rest[:length])
            chunk = await self.proc.stdout.read(1 << 20)
            if not chunk:
                raise EOFError("server closed stdout")
            self.buffer += chunk

    async def response(self, msg_id, timeout=60.0) -> dict:
        async def wait():
            while True:
                message = await self.read()
                if message.get("id") == msg_id and ("result" in message or "error" in message):
                    return message
                if message.get("method") == "workspace/configuration":  # answer the server's own requests
                    self.send({"jsonrpc": "2.0", "id": message["id"], "result": [{}]})
        return await asyncio.wait_for(wait(), timeout)

    async def alive(self, n: int) -> bool:
        self.send({"jsonrpc": "2.0", "id": f"alive-{n}", "method": "mellum/status", "params": {}})
        return "result" in await self.response(f"alive-{n}")


def inline(msg_id, uri, line, character):
    return {"jsonrpc": "2.0", "id": msg_id, "method": "textDocument/inlineCompletion",
            "params": {"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
                       "context": {"triggerKind": 1}}}


async def fuzz_lsp(model: Path, tmp: Path) -> dict:
    lsp = await RawLsp.start(model, tmp)
    lsp.send({"jsonrpc": "2.0", "id": "init", "method": "initialize",
              "params": {"processId": None, "rootUri": PROJECT.as_uri(), "capabilities": {},
                         "initializationOptions": {"maxNewTokens": 8}}})
    await lsp.response("init", 120)
    lsp.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    uri = f"file://{PROJECT}/fuzz.py"
    emoji = "x = '😀😀'\n" * 3
    lsp.send({"jsonrpc": "2.0", "method": "textDocument/didOpen",
              "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": emoji}}})
    results, n = {}, 0

    async def case(name, send, expect_id=None):
        nonlocal n
        n += 1
        t0 = time.perf_counter()
        send()
        answer = None
        try:
            if expect_id is not None:
                answer = await lsp.response(expect_id)
            ok = await lsp.alive(n)
        except Exception as exc:
            ok, answer = False, repr(exc)
        kind = None if answer is None else ("error" if isinstance(answer, dict) and "error" in answer else
                                            "result" if isinstance(answer, dict) else answer)
        results[name] = {"answer": kind, "still_serving": ok, "ms": round((time.perf_counter() - t0) * 1000)}

    await case("not json", lambda: lsp.send_bytes(b"{not json"))
    await case("json array", lambda: lsp.send_bytes(b"[1, 2, 3]"))
    await case("no method", lambda: lsp.send({"jsonrpc": "2.0", "id": 5}))
    await case("invalid utf-8", lambda: lsp.send_bytes(b'{"jsonrpc": "2.0", "id": "u", "method": "\xff\xfe"}'))
    await case("unknown method", lambda: lsp.send({"jsonrpc": "2.0", "id": "m", "method": "no/such", "params": {}}),
               "m")
    await case("wrong types", lambda: lsp.send(inline("t", uri, "zero", None)), "t")
    await case("negative position", lambda: lsp.send(inline("neg", uri, -1, -1)), "neg")
    await case("past the end", lambda: lsp.send(inline("end", uri, 10 ** 6, 10 ** 6)), "end")
    await case("inside a surrogate pair", lambda: lsp.send(inline("sur", uri, 0, 6)), "sur")
    await case("unknown document", lambda: lsp.send(inline("doc", "file:///nope.py", 0, 0)), "doc")
    binary = "".join(chr(c) for c in range(0, 32)) + "\ud800 lone surrogate \udfff" + "\x7f\x80\x9f"
    await case("binary content", lambda: (
        lsp.send({"jsonrpc": "2.0", "method": "textDocument/didOpen",
                  "params": {"textDocument": {"uri": uri + "b", "languageId": "python", "version": 1,
                                              "text": binary}}}),
        lsp.send(inline("bin", uri + "b", 0, 10))), "bin")
    big = ("def f(x):\n    return x * 2  # padding padding padding padding padding\n" * 150_000)[:10_000_000]
    await case("10 MB document", lambda: (
        lsp.send({"jsonrpc": "2.0", "method": "textDocument/didOpen",
                  "params": {"textDocument": {"uri": uri + "big", "languageId": "python", "version": 1, "text": big}}}),
        lsp.send(inline("big", uri + "big", 70_000, 4))), "big")
    await case("10 MB incremental edit", lambda: (
        lsp.send({"jsonrpc": "2.0", "method": "textDocument/didChange",
                  "params": {"textDocument": {"uri": uri + "big", "version": 2},
                             "contentChanges": [{"range": {"start": {"line": 5, "character": 0},
                                                           "end": {"line": 5, "character": 0}}, "text": "# hi\n"}]}}),
        lsp.send(inline("big2", uri + "big", 149_000, 4))), "big2")
    await case("bad telemetry", lambda: lsp.send({"jsonrpc": "2.0", "id": "tel", "method": "mellum/telemetry",
                                                  "params": {"id": 5, "event": None}}), "tel")
    lsp.send({"jsonrpc": "2.0", "id": "down", "method": "shutdown"})
    await lsp.response("down")
    lsp.send({"jsonrpc": "2.0", "method": "exit"})
    await asyncio.wait_for(lsp.proc.wait(), 30)
    for name, r in results.items():
        print(f"  lsp fuzz {name:24s} answer={r['answer']!s:7s} still serving={r['still_serving']} ({r['ms']} ms)")
    return results


def fuzz_http(model: Path, tmp: Path, run_schemathesis: bool) -> dict:
    import httpx

    proc, base = start_http(model, tmp, 1)
    results = {}
    try:
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        cases = {
            "invalid json": dict(content=b"{nope", headers={"content-type": "application/json"}),
            "invalid utf-8": dict(content=b'{"path": "a.py", "prefix": "\xff\xfe"}',
                                  headers={"content-type": "application/json"}),
            "lone surrogate": dict(content=b'{"path": "a.py", "prefix": "x\\ud800", "options": {"max_tokens": 2}}',
                                   headers={"content-type": "application/json"}),
            "nul in path": dict(json={"path": "a\u0000.py", "prefix": "x", "project_root": str(PROJECT) + "\u0000"}),
            "binary prefix": dict(json={"path": "a.py", "prefix": "".join(map(chr, range(32))),
                                        "options": {"max_tokens": 2}}),
            "deep nesting": dict(content=b'{"path": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                 headers={"content-type": "application/json"}),
            "10 MB body": dict(json={"path": "a.py", "prefix": "x" * 10_000_000}),
            "wrong types": dict(json={"path": 5, "prefix": None, "options": {"max_tokens": "many"}}),
        }
        for name, kwargs in cases.items():
            try:
                r = c.post("/v1/fim", **kwargs)
                status = r.status_code
            except httpx.HTTPError as exc:
                status = repr(exc)
            alive = c.get("/health").status_code == 200
            results[name] = {"status": status, "still_serving": alive}
            print(f"  http fuzz {name:16s} status={status} still serving={alive}")
        if run_schemathesis:
            results["schemathesis"] = schemathesis(base)
    finally:
        proc.terminate()
        proc.wait(15)
    return results


def schemathesis(base: str) -> dict:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        print("  schemathesis not installed (pip install schemathesis): skipped")
        return {"skipped": True}
    cmd = [exe, "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {KEY}", "--checks",
           "not_a_server_error", "--max-examples", "25", "--workers", "2", "--request-timeout", "120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    tail = "\n".join(done.stdout.strip().splitlines()[-12:])
    print("  schemathesis:", "passed" if done.returncode == 0 else f"FAILED (rc {done.returncode})")
    print("   ", tail.replace("\n", "\n    "))
    return {"returncode": done.returncode}


# ---- main ---------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the bundled model, else a random tiny one)")
    p.add_argument("--mode", default="http,lsp,fuzz", help="comma list of: http, lsp, fuzz")
    p.add_argument("--typists", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="engine worker threads in the HTTP server")
    p.add_argument("--schemathesis", action="store_true", help="also run schemathesis against /openapi.json")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="engine prefix-cache budget for the servers (the cache fills up to it: RSS grows by that much)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.prefix_cache_mb is not None:
        CACHE_ARGS.extend(["--prefix-cache-mb", str(args.prefix_cache_mb)])
    modes = {m.strip() for m in args.mode.split(",") if m.strip()}
    if not modes or modes - {"http", "lsp", "fuzz"}:
        p.error(f"--mode takes a comma list of http, lsp, fuzz: {args.mode!r}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = pick_model(args.model, tmp)
        print(f"model {model}; {args.typists} typists x {args.seconds:.0f} s; max {args.max_new_tokens} new tokens")
        if "http" in modes:
            results["http"] = asyncio.run(soak_http(model, tmp, args.typists, args.seconds, args.max_new_tokens,
                                                    args.workers))
        if "lsp" in modes:
            results["lsp"] = asyncio.run(soak_lsp(model, tmp, args.typists, args.seconds, args.max_new_tokens))
        if "fuzz" in modes:
            results["fuzz_lsp"] = asyncio.run(fuzz_lsp(model, tmp))
            results["fuzz_http"] = fuzz_http(model, tmp, args.schemathesis)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k in ("http", "lsp") if k in results and results[k]["errors"]]
    failed += [f"fuzz_lsp:{k}" for k, v in results.get("fuzz_lsp", {}).items() if not v["still_serving"]]
    failed += [f"fuzz_http:{k}" for k, v in results.get("fuzz_http", {}).items()
               if isinstance(v, dict) and "status" in v and (not v["still_serving"] or
                                                             not isinstance(v["status"], int) or v["status"] >= 500)]
    if results.get("fuzz_http", {}).get("schemathesis", {}).get("returncode"):
        failed.append("schemathesis")
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
