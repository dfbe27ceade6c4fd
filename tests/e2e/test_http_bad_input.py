"""`mellum serve` with the bundled model (the default), as a user runs it: inputs that used to crash it or be
answered wrongly, and a client that hangs up on a chat request."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import serve_process

pytestmark = pytest.mark.timeout(180)
# Greedy with the bundled model: an SQL string that it fills with "0, 1, 2, ..." until max_tokens runs out.
LONG = {"prompt": 'SQL = """\nSELECT', "suffix": '\n"""\n'}


@contextlib.contextmanager
def _serve(log_path, *extra):
    """`mellum serve` with the bundled model on a free port: (httpx client, port) once /health answers."""
    import httpx

    with serve_process(["--no-telemetry", *extra], log_path, 150) as (_, base):
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client, int(base.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serve(tmp_path_factory.mktemp("http-bad-input") / "server.log") as (client, port):
        yield {"client": client, "port": port}


def _post_and_hang_up(port: int, path: str, body: dict, after_s: float) -> None:
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode()
                  + b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        time.sleep(after_s)


def test_seeds_the_engine_cannot_take_are_a_4xx(server):
    c = server["client"]
    too_big = 2**64
    for path, body in [("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 1, "seed": too_big}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True, "seed": -(2**63) - 1}),
                       ("/v1/fim", {"path": "a.py", "prefix": "x", "options": {"max_tokens": 2, "seed": too_big}}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "seed": too_big})]:
        r = c.post(path, json=body)
        assert r.status_code == 422 and "seed" in r.json()["error"]["message"], (path, r.text)
    # The ends of the range still work.
    for seed in (2**64 - 1, -(2**63)):
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 1, "seed": seed})
        assert r.status_code == 200, r.text


def test_nan_and_infinity_are_a_4xx(server):
    # Python's JSON parser takes NaN and Infinity; the error reply must still be valid JSON.
    c = server["client"]
    chat = b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'
    for path, raw in [("/v1/fim", b'{"path": "a.py", "prefix": "x", "options": {"temperature": NaN}}'),
                      ("/v1/fim", b'{"path": "a.py", "prefix": "x", "options": {"top_p": NaN}}'),
                      ("/v1/completions", b'{"prompt": "x", "temperature": -Infinity}'),
                      ("/v1/chat/completions", chat)]:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_request"


def test_streamed_finish_reason_matches_the_whole_answer(server):
    c = server["client"]
    reasons = []
    for body in [{**LONG, "max_tokens": 8}, {"prompt": "def add(a, b):\n    return ", "max_tokens": 16}]:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]
        lines = c.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
        chunks = [json.loads(x[len("data: "):]) for x in lines if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["text"]
        reasons.append((whole["finish_reason"], chunks[-1]["choices"][0]["finish_reason"]))
    assert reasons == [("length", "length"), ("stop", "stop")]


def test_a_streamed_request_the_service_refuses_is_the_same_4xx(server):
    """The headers wait for the first piece: an error the client can fix is not a 200 carrying an error event."""
    c = server["client"]
    body = {"prompt": "def f():\n", "max_tokens": 2048}  # no room left for a prompt in the model's window
    whole = c.post("/v1/completions", json=body)
    streamed = c.post("/v1/completions", json={**body, "stream": True})
    assert whole.status_code == streamed.status_code == 400, (whole.text, streamed.text)
    assert streamed.json()["error"]["message"] == whole.json()["error"]["message"]
    assert c.get("/health").json()["queue_depth"] == 0


def test_chat_client_that_hangs_up_cancels_the_engine(server):
    """A closed connection cancels the engine work (docs/serving.md), for chat as for the other routes."""
    c = server["client"]
    long_answer = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a long story"}],
                                                       "max_tokens": 900})
    assert long_answer.json()["usage"]["completion_tokens"] == 900  # it runs for seconds: room to hang up
    _post_and_hang_up(server["port"], "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 900}, 0.3)
    pattern = re.compile(r'^mellum_cancelled_total\{endpoint="/v1/chat/completions"\} (\d+)', re.M)
    deadline = time.time() + 30
    while not pattern.search(text := c.get("/metrics").text) and time.time() < deadline:
        time.sleep(0.1)
    assert pattern.search(text), text
    assert c.get("/health").json()["queue_depth"] == 0
    assert 'mellum_requests_total{endpoint="/v1/chat/completions",status="200"} 1\n' in c.get("/metrics").text


def test_a_stream_dropped_before_its_first_piece_is_a_clean_cancel(tmp_path):
    """An editor that cancels while the prompt is still being processed: the stream's headers are not sent yet.
    Here the generation backend (--backend-url) says nothing, so the hang-up always comes first."""
    release = threading.Event()

    class Silent(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            release.wait(30)  # a backend still busy with the prompt

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    log = tmp_path / "server.log"
    try:
        with _serve(log, "--backend-url", f"http://127.0.0.1:{backend.server_address[1]}/v1") as (c, port):
            _post_and_hang_up(port, "/v1/completions", {"prompt": "def f():\n", "max_tokens": 4, "stream": True},
                              0.5)
            pattern = re.compile(r'^mellum_cancelled_total\{endpoint="/v1/completions"\} 1', re.M)
            deadline = time.time() + 30
            while not pattern.search(text := c.get("/metrics").text) and time.time() < deadline:
                time.sleep(0.1)
            assert pattern.search(text), text
            assert 'status="500"' not in text  # the cancel was a 499, not a crash
            assert c.get("/health").json()["queue_depth"] == 0
    finally:
        release.set()
        backend.shutdown()
    assert "Traceback" not in log.read_text()
