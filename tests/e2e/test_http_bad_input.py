"""`mellum serve` with the bundled model (the default), as a user runs it: inputs that used to crash it or be
answered wrongly, and a client that hangs up on a chat request."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.ports import free_port

from .conftest import PYTHON, server_env

pytestmark = pytest.mark.timeout(180)
# Greedy with the bundled model: an SQL string that it fills with "0, 1, 2, ..." until max_tokens runs out.
LONG = {"prompt": 'SQL = """\nSELECT', "suffix": '\n"""\n'}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("http-bad-input")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([PYTHON, "-m", "mellum.cli", "serve", "--port", str(port), "--no-telemetry"],
                            env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 150
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not come up in 150 s")
    client = httpx.Client(base_url=base, timeout=60)
    yield {"client": client, "port": port}
    client.close()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


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
    body = json.dumps({"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 900}).encode()
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.3)
    pattern = re.compile(r'^mellum_cancelled_total\{endpoint="/v1/chat/completions"\} (\d+)', re.M)
    deadline = time.time() + 30
    while not pattern.search(text := c.get("/metrics").text) and time.time() < deadline:
        time.sleep(0.1)
    assert pattern.search(text), text
    assert c.get("/health").json()["queue_depth"] == 0
    assert 'mellum_requests_total{endpoint="/v1/chat/completions",status="200"} 1\n' in c.get("/metrics").text
