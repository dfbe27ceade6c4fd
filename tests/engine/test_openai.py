"""The remote backend against a real HTTP server speaking the OpenAI completions stream (backed by the native engine)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mellum.engine import NativeEngine, SamplingParams
from tests.engine.helpers import tiny_model

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served():
    native = NativeEngine(tiny_model("tiny-dense"), speculative=None)
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            if self.path not in ("/v1/completions", "/llama/v1/completions"):
                self.send_error(404)
                return
            # /llama/...: llama-server's stream, ids only in logprobs.content (special tokens stream as empty text),
            # and stop_token_ids ignored (the client must stop on the ids it reads).
            llama_style = self.path.startswith("/llama/")
            bias = body.get("logit_bias")
            params = SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    stop_ids=() if llama_style else body.get("stop_token_ids", ()),
                                    allowed_first_ids=[int(k) for k in bias] if bias else None)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            result = native.generate(body["prompt"], params)
            for token in result.tokens:
                chunk = {"choices": [{"index": 0, "text": "", "token_ids": [token], "finish_reason": None}]}
                if llama_style:
                    chunk = {"choices": [{"index": 0, "text": "", "finish_reason": None,
                                          "logprobs": {"content": [{"id": token, "token": "", "logprob": -0.1}]}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            finish = "length" if result.stop_reason == "length" else "stop"
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': '', 'finish_reason': finish}]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that stopped at its stop id hangs up (OpenAIEngine._hang_up): the rest is not read

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", native, requests
    server.shutdown()
    native.close()


def test_remote_backend_returns_what_the_server_generates(served):
    from mellum.engine.openai import OpenAIEngine

    url, native, requests = served
    remote = OpenAIEngine(url, model="tiny", vocab_size=1024, newline_ids=[])
    try:
        prompt = list(range(3, 40))
        params = SamplingParams(max_new_tokens=10)
        streamed = []
        got = remote.generate(prompt, params, on_token=streamed.append)
        want = native.generate(prompt, params)
        assert got.tokens == want.tokens == streamed and got.stop_reason == "length"
        assert requests[-1]["prompt"] == prompt  # token ids on the wire
        healed = remote.generate(prompt, SamplingParams(max_new_tokens=5, allowed_first_ids=[77]))
        assert healed.tokens[0] == 77 and len(healed.tokens) == 5
        assert requests[-2]["max_tokens"] == 1 and requests[-2]["logit_bias"] == {"77": 100}
        # A constraint over two tokens: two one-token requests, each with its own bias, then the rest.
        constrained = SamplingParams(max_new_tokens=5, allowed_next=lambda g: {0: (77,), 1: (91, 92)}.get(len(g)))
        healed = remote.generate(prompt, constrained)
        assert healed.tokens[:2] in ([77, 91], [77, 92]) and len(healed.tokens) == 5
        assert [r.get("logit_bias") for r in requests[-3:]] == [{"77": 100}, {"91": 100, "92": 100}, None]
        assert requests[-2]["prompt"] == prompt + [77] and requests[-1]["max_tokens"] == 3
        with pytest.raises(ValueError, match="empty"):
            remote.generate([], params)
        with pytest.raises(ValueError, match="vocabulary"):
            remote.generate([5000], params)
    finally:
        remote.close()


def test_complete_command_over_a_remote_backend(served, tiny_model_dir, tmp_path, capsys):
    """`mellum complete --backend-url`: the service builds the same prompt from the model directory's tokenizer and
    the server generates it; the completion equals the in-process one on the same weights (served is tiny-dense,
    seed 0, as tiny_model_dir)."""
    from mellum.cli import main

    url, _, requests = served
    src = tmp_path / "calc.py"
    src.write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - \n")
    where = ["--file", str(src), "--line", "6", "--column", "16", "--json", "--max-new-tokens", "8",
             "--model", str(tiny_model_dir)]
    assert main(["complete", *where]) == 0
    local = json.loads(capsys.readouterr().out)
    before = len(requests)
    assert main(["complete", *where, "--backend-url", url, "--backend-model", "tiny"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert len(requests) > before and requests[-1]["model"] == "tiny" and requests[-1]["stream"] is True
    assert remote["text"] == local["text"] and remote["prompt_tokens"] == local["prompt_tokens"]
    assert remote["generated_tokens"] == local["generated_tokens"] > 0
    # A server that is not there: a clear error, not a traceback.
    assert main(["complete", *where, "--backend-url", "http://127.0.0.1:9/v1"]) == 2
    assert "cannot reach the backend at http://127.0.0.1:9/v1/completions" in capsys.readouterr().err


def test_serve_and_lsp_load_the_remote_service(served, tiny_model_dir):
    """`mellum serve` / `mellum lsp` build their service with load_service: --backend-url gives the remote one."""
    import argparse

    from mellum.commands.serve import add_model_arguments, load_service
    from mellum.complete import CompletionRequest
    from mellum.engine.openai import OpenAIEngine

    url, _, requests = served
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--backend-url", url, "--backend-model", "tiny", "--backend-api-key", "k"])
    service = load_service(tiny_model_dir, args)
    try:
        assert isinstance(service.engine, OpenAIEngine) and service.config.max_healing_ids == 300
        done = service.complete(CompletionRequest(path="a.py", prefix="def f(x):\n    return ", suffix="\n",
                                                  max_new_tokens=6))
        assert requests[-1]["model"] == "tiny" and done.generated_tokens <= 6 and done.stop_reason
    finally:
        service.close()


def test_ids_from_llama_server_logprobs(served):
    """llama-server's /v1/completions streams text only (special tokens as ""), plus, with logprobs, each token's id,
    and ignores stop_token_ids: the backend reads the ids there and stops on them itself."""
    from mellum.engine.openai import OpenAIEngine

    url, native, requests = served
    remote = OpenAIEngine(url.replace("/v1", "/llama/v1"), model="tiny", vocab_size=1024)  # no encode: ids needed
    try:
        prompt = list(range(7, 50))
        want = native.generate(prompt, SamplingParams(max_new_tokens=8)).tokens
        assert remote.generate(prompt, SamplingParams(max_new_tokens=8)).tokens == want
        body = requests[-1]
        assert body["logprobs"] == 1 and body["top_k"] == -1 and body["min_p"] == 0.0
        stopped = remote.generate(prompt, SamplingParams(max_new_tokens=8, stop_ids=(want[3],)))
        assert stopped.tokens == want[:want.index(want[3])] and stopped.stop_reason == "stop"
    finally:
        remote.close()


@pytest.fixture()
def misbehaving():
    """A real HTTP server whose path picks how its answer goes wrong; /stall... waits until `release` is set."""
    release = threading.Event()

    def chunk(ids, finish=None):
        return f"data: {json.dumps({'choices': [{'text': '', 'token_ids': ids, 'finish_reason': finish}]})}\n\n"

    answers = {
        "malformed": chunk([5]) + "data: {not json\n\n",
        "cut": chunk([5]) + chunk([6]),  # the connection closes: no finish_reason, no [DONE]
        "llama-error": chunk([5]) + 'data: {"error": {"code": 500, "message": "out of memory"}}\n\ndata: [DONE]\n\n',
        "vllm-error": chunk([5]) + 'data: {"object": "error", "message": "engine dead", "code": 500}\n\n',
        "not-streamed": json.dumps({"choices": [{"text": "", "token_ids": [5, 6], "finish_reason": "length"}]}),
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            mode = self.path.split("/")[1]
            if mode == "stall-before-headers":
                release.wait(15)
            if mode == "refused":  # a server that cannot take token-id prompts (mellum serve: 422)
                self.send_response(422)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "prompt must be\\ntext", "type": "invalid_request_error"}}')
                return
            if mode in ("busy", "busy-503", "busy-no-header"):  # a server shedding load (mellum serve --max-queue)
                self.send_response({"busy": 429, "busy-503": 503, "busy-no-header": 429}[mode])
                if mode != "busy-no-header":
                    self.send_header("Retry-After", "7")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "overloaded"}}')
                return
            self.send_response(500 if mode == "status" else 200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if mode == "stall":  # one token, then silence (a server busy with other requests)
                self.wfile.write(chunk([5]).encode())
                self.wfile.flush()
                release.wait(15)
            self.wfile.write(answers.get(mode, chunk([6], "length")).encode())

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # writing to a client that gave up (the deadline and cancel cases): expected, not worth a traceback

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()


@pytest.mark.parametrize("mode, message", [
    ("status", "answered 500"),
    ("refused", r"answered 422: prompt must be text$"),  # was the raw body as b'{"error": ...}', 500 bytes of it
    ("malformed", "not JSON"),  # was a bare JSONDecodeError, a ValueError the HTTP server answers as a bad request
    ("cut", "cut off"),  # was a normal "stop" with half a completion
    ("llama-error", "out of memory"),  # error events were skipped: "stop"
    ("vllm-error", "engine dead"),
    ("not-streamed", "does not stream"),  # was an empty completion
])
def test_a_failing_server_raises_with_what_it_said(misbehaving, mode, message):
    from mellum.engine.openai import BackendError, OpenAIEngine

    remote = OpenAIEngine(f"{misbehaving}/{mode}/v1", model="tiny", vocab_size=1024)
    try:
        with pytest.raises(BackendError, match=message):
            remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4))
    finally:
        remote.close()


@pytest.mark.parametrize("mode, retry_after", [("busy", 7), ("busy-503", 7), ("busy-no-header", 1)])
def test_a_busy_server_says_when_to_come_back(misbehaving, mode, retry_after):
    """A 429 (or a 503 with Retry-After) is load shedding, not a failure: `mellum serve` passes it on as a 429."""
    from mellum.engine.openai import BackendBusy, OpenAIEngine

    remote = OpenAIEngine(f"{misbehaving}/{mode}/v1", model="tiny", vocab_size=1024)
    try:
        with pytest.raises(BackendBusy, match="busy") as caught:
            remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4))
        assert caught.value.retry_after_s == retry_after
    finally:
        remote.close()


def test_serve_passes_a_busy_backend_on_as_429(misbehaving, tiny_model_dir):
    import argparse

    from fastapi.testclient import TestClient

    from mellum.commands.serve import add_model_arguments, load_service
    from mellum.serve.http import HttpConfig, create_app

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    service = load_service(tiny_model_dir, parser.parse_args(["--backend-url", f"{misbehaving}/busy/v1"]))
    app = create_app(service, HttpConfig())
    with TestClient(app) as client:
        r = client.post("/v1/fim", json={"path": "a.py", "prefix": "x = ", "options": {"max_tokens": 4}})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "backend_overloaded"
        r = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 4, "stream": True})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"


@pytest.mark.parametrize("mode", ["stall", "stall-before-headers"])
def test_deadline_and_cancel_do_not_wait_for_a_silent_server(misbehaving, mode):
    """The response was read on the caller's thread, so a deadline or a cancel took effect only when the server
    next sent a line (here after 15 s; in general up to timeout_s)."""
    from mellum.engine.openai import OpenAIEngine

    remote = OpenAIEngine(f"{misbehaving}/{mode}/v1", model="tiny", vocab_size=1024)
    try:
        t0 = time.perf_counter()
        late = remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4, deadline_s=0.3))
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        cancelled = remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4), cancel=cancel)
        assert time.perf_counter() - t0 < 10
        streamed = [5] if mode == "stall" else []
        assert (late.stop_reason, late.tokens) == ("deadline", streamed)
        assert (cancelled.stop_reason, cancelled.tokens) == ("cancelled", streamed)
    finally:
        remote.close()


def test_remote_input_is_checked_as_the_native_engine_does(served):
    from mellum.engine.openai import OpenAIEngine

    url, _, requests = served
    remote = OpenAIEngine(url, model="tiny", vocab_size=1024)  # no newline_ids
    try:
        before = len(requests)
        with pytest.raises(ValueError, match="integers"):  # was sent as [1, 2]: a float cast to another token
            remote.generate([1.7, 2], SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="newline_ids"):  # max_lines was ignored
            remote.generate([1, 2], SamplingParams(max_new_tokens=2, max_lines=1))
        assert len(requests) == before
    finally:
        remote.close()


def test_a_cancelled_request_hangs_up_at_once():
    """After a cancel the reader thread stayed blocked on the silent connection until the server's next line or
    timeout_s: the server kept generating for nobody and the thread and connection lived on. Now the socket is shut
    down: the server sees the client go, and the reader ends."""
    from mellum.engine.openai import OpenAIEngine

    seen_gone = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": [{"text": "", "token_ids": [5], "finish_reason": null}]}\n\n')
            self.wfile.flush()
            self.connection.settimeout(20)
            t0 = time.perf_counter()
            try:
                gone = self.connection.recv(1) == b""  # end of file: the client hung up
            except OSError:
                gone = True
            seen_gone.append((gone, time.perf_counter() - t0))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = OpenAIEngine(f"http://127.0.0.1:{server.server_address[1]}/v1", model="tiny", vocab_size=1024,
                          timeout_s=30)
    before = set(threading.enumerate())

    def readers():
        return [t for t in threading.enumerate() if t.name == "mellum-remote" and t not in before]

    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        result = remote.generate([1, 2, 3], SamplingParams(max_new_tokens=4), cancel=cancel)
        assert (result.stop_reason, result.tokens) == ("cancelled", [5])
        deadline = time.perf_counter() + 10
        while not seen_gone and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert seen_gone and seen_gone[0][0] and seen_gone[0][1] < 5, seen_gone
        while readers() and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert not readers()
    finally:
        remote.close()
        server.shutdown()


def test_one_completions_url_for_the_backend_and_the_eval_client():
    from mellum.engine.openai import OpenAIEngine, completions_url

    for given in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                  "http://h:8000/v1/completions"):
        assert completions_url(given) == "http://h:8000/v1/completions"
        remote = OpenAIEngine(given, model="tiny")
        assert remote.url == "http://h:8000/v1/completions"  # the endpoint itself was doubled onto
        remote.close()
