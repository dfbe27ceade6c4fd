"""`mellum serve` as a subprocess (uvicorn): httpx and the official `openai` client against it, workspace
security through the server, and telemetry that survives `kill -9` and exports into DPO pairs."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess

import pytest

from .conftest import PYTHON, serve_process, server_env

pytestmark = pytest.mark.timeout(150)
KEY = "e2e-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir, workspace, tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("http-e2e")
    db = tmp / "telemetry.db"
    args = ["--model", str(tiny_model_dir), "--api-key", KEY, "--workspace", str(workspace), "--telemetry", str(db)]
    with serve_process(args, tmp / "server.log", 120) as (proc, base):
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            yield {"proc": proc, "base": base, "db": db, "client": client, "tmp": tmp}


def test_binds_loopback_and_refuses_requests_without_the_key(server):
    import httpx

    # Bound to loopback only: the machine's other addresses do not answer.
    port = int(server["base"].rsplit(":", 1)[1])
    others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in others:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/health", timeout=2)
    r = httpx.post(server["base"] + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = server["client"].post("/v1/completions", json={"prompt": "def f():\n    ", "max_tokens": 4})
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["text"], str)


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)
    done = client.completions.create(model="tiny", prompt="import os\n\ndef main():\n", suffix="\n", max_tokens=8)
    assert done.object == "text_completion" and isinstance(done.choices[0].text, str)
    assert done.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="import os\n\ndef main():\n", suffix="\n", max_tokens=8, stream=True))
    assert streamed == done.choices[0].text  # greedy: the stream spells the same answer
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=1)


def test_official_client_gets_a_clear_error_for_fields_it_cannot_have(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="echo"):  # silently dropping it returns text without the prompt
        client.completions.create(model="tiny", prompt="x = ", max_tokens=2, echo=True)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="x = ", max_tokens=2, logprobs=1)
    chunks = list(client.completions.create(model="tiny", prompt="x = ", max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 2


def test_context_never_leaves_the_workspace(server, workspace):
    """Secrets (.env) and files reached through a symlink out of the root never reach the prompt."""
    c = server["client"]
    r = c.post("/v1/fim", json={"path": "shop/pricing.py", "prefix": "from shop.models import ",
                                "suffix": "\n", "project_root": str(workspace),
                                "options": {"max_tokens": 4, "return_prompt": True}})
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt"]
    assert "SECRET-IN-DOTENV" not in prompt and "SECRET-OUTSIDE-ROOT" not in prompt
    # Secrets the client itself sends (an open .env buffer, a key pasted as a snippet) are dropped too,
    # while an ordinary snippet is used.
    r = c.post("/v1/fim", json={"path": "shop/cli.py", "prefix": "x = ", "project_root": str(workspace),
                                "open_files": {str(workspace / ".env"): "TOKEN=sk-OPEN-BUFFER-SECRET\n"},
                                "extra_context": [{"path": "deploy/id_rsa", "text": "-----BEGIN RSA PRIVATE KEY-----"},
                                                  {"path": "notes.py", "text": "HARMLESS_SNIPPET = 1\n"}],
                                "options": {"max_tokens": 2, "return_prompt": True}})
    prompt = r.json()["prompt"]
    assert "OPEN-BUFFER-SECRET" not in prompt and "PRIVATE KEY" not in prompt
    assert "HARMLESS_SNIPPET" in prompt
    for root in [str(workspace / ".."), str(workspace / "linked_outside.py" / ".."), "/etc"]:
        r = c.post("/v1/fim", json={"path": "a.py", "prefix": "x", "project_root": root})
        assert r.status_code == 403, root


def test_metrics_are_prometheus_text(server):
    text = server["client"].get("/metrics").text
    assert "# TYPE mellum_request_latency_seconds histogram" in text
    assert 'mellum_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_telemetry_survives_kill_9_and_exports_pairs(server, tmp_path):
    c = server["client"]
    body = {"path": "shop/cli.py", "prefix": "def main(argv=None):\n    ", "suffix": "\n",
            "options": {"max_tokens": 6, "temperature": 1.0}}
    texts, ids = set(), []
    for seed in range(8):  # two different answers for the same context
        r = c.post("/v1/fim", json={**body, "options": {**body["options"], "seed": seed}}).json()
        if r["completion"].strip() and r["completion"] not in texts:
            texts.add(r["completion"])
            ids.append(r["id"])
        if len(ids) == 2:
            break
    assert len(ids) == 2, "sampling gave no two different completions"
    good, bad = ids
    events = [{"id": good, "event": "shown"}, {"id": good, "event": "accepted"},
              {"id": bad, "event": "shown"}, {"id": bad, "event": "rejected"}]
    assert c.post("/v1/telemetry", json={"events": events}).json() == {"recorded": 4}
    os.kill(server["proc"].pid, signal.SIGKILL)  # no shutdown hooks, no flush
    server["proc"].wait()
    rows = sqlite3.connect(server["db"]).execute("SELECT completion_id, event FROM events ORDER BY seq").fetchall()
    assert rows[-4:] == [(e["id"], e["event"]) for e in events]
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([PYTHON, "-m", "mellum.cli", "data", "preferences", "--telemetry", str(server["db"]),
                           "--out", str(out)], env=server_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [(good, bad)]
    assert pairs[0]["prompt"].endswith("<fim_middle>") and pairs[0]["chosen"] != pairs[0]["rejected"]
    from mellum.train.dpo import read_pairs  # the consumer: `mellum train dpo`

    assert [p["chosen_id"] for p in read_pairs(out)] == [good]
