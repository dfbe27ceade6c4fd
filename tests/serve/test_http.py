"""HTTP API on the real app and a real tiny model (in-process ASGI client): routes, auth, limits, errors."""

from __future__ import annotations

import gzip
import json

import pytest

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def app_and_store(tiny_service, tmp_path_factory):
    from mellum.serve.http import HttpConfig, create_app
    from mellum.serve.telemetry import TelemetryStore

    tmp = tmp_path_factory.mktemp("http")
    workspace = tmp / "project"
    (workspace / "pkg").mkdir(parents=True)
    store = TelemetryStore(tmp / "telemetry.db")
    config = HttpConfig(api_key=KEY, max_body_bytes=64_000, max_tokens_limit=64, workspaces=(str(workspace),),
                        model_name="tiny")
    app = create_app(tiny_service, config, telemetry=store)
    yield app, store, workspace
    store.close()


@pytest.fixture(scope="module")
def client(app_and_store):
    from fastapi.testclient import TestClient

    with TestClient(app_and_store[0], headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_health_is_open_and_everything_else_needs_the_key(client):
    from fastapi.testclient import TestClient

    bare = TestClient(client.app)
    assert bare.get("/health").json()["status"] == "ok"
    for method, path in [("post", "/v1/completions"), ("post", "/v1/fim"), ("get", "/metrics"), ("get", "/openapi.json"),
                         ("post", "/v1/telemetry"), ("get", "/v1/models")]:
        r = getattr(bare, method)(path, **({"json": {}} if method == "post" else {}))
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert bare.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/completions", "/v1/fim", "/v1/telemetry"}


def test_api_key_check_takes_any_header_case_and_a_non_ascii_key(tiny_service):
    from fastapi.testclient import TestClient

    from mellum.serve.http import HttpConfig, create_app

    with TestClient(create_app(tiny_service, HttpConfig(api_key="clé-ü", model_name="tiny"))) as c:
        for header, value in [("Authorization", "Bearer clé-ü"), ("AUTHORIZATION", "bearer clé-ü")]:
            assert c.get("/v1/models", headers={header: value.encode()}).status_code == 200, header
        assert c.get("/v1/models", headers={"Authorization": "Bearer cle-u"}).status_code == 401


def test_openai_completion_shape(client):
    r = client.post("/v1/completions", json={"prompt": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0


def test_streaming_matches_the_whole_answer(client):
    req = {"prompt": "import os\n\ndef main():\n", "max_tokens": 24, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]  # "length" when max_tokens ran out
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_fim_returns_id_timings_and_the_exact_prompt(client):
    r = client.post("/v1/fim", json={
        "path": "pkg/m.py", "prefix": "def f():\n    return ", "suffix": "\n",
        "extra_context": [{"path": "pkg/util.py", "text": "HELPER = 1\n"}],
        "options": {"max_tokens": 6, "return_prompt": True},
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["id"]) >= 8 and body["timings_ms"]["total"] > 0
    assert "<filename>pkg/util.py\nHELPER = 1\n" in body["prompt"]
    # (token healing may back the last token off the prompt: "return " ends as "return")
    assert "<fim_suffix>\n<fim_prefix>def f():\n    return" in body["prompt"]
    assert body["prompt"].endswith("<fim_middle>")
    # Without return_prompt the prompt stays server-side (telemetry keeps it).
    r2 = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "options": {"max_tokens": 4}})
    assert "prompt" not in r2.json()


def test_project_root_must_be_a_workspace(client, app_and_store, tmp_path):
    workspace = app_and_store[2]
    ok = client.post("/v1/fim", json={"path": "pkg/a.py", "prefix": "x", "project_root": str(workspace / "pkg"),
                                      "options": {"max_tokens": 2}})
    assert ok.status_code == 200, ok.text
    for root in [str(tmp_path), str(workspace / ".." / ".."), "/"]:
        r = client.post("/v1/fim", json={"path": "a.py", "prefix": "x", "project_root": root})
        assert r.status_code == 403 and r.json()["error"]["code"] == "project_root_forbidden", root


def test_clear_4xx_errors(client):
    r = client.post("/v1/fim", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("invalid request")
    r = client.post("/v1/fim", json={"prefix": "x"})
    assert r.status_code == 422 and "path" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1000})
    assert r.status_code == 400 and "limit of 64" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400
    # A compressed body was "There was an error parsing the body" (400): say what is unsupported.
    r = client.post("/v1/completions", content=gzip.compress(b'{"prompt": "x"}'),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and "send the request body uncompressed" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}',
                    headers={"content-type": "application/json", "content-encoding": "identity"})
    assert r.status_code == 200
    r = client.post("/v1/fim", json={"path": "a.py", "prefix": "", "options": {"deadline_ms": 5e-324}})
    assert r.status_code in (200, 400), r.text  # found by schemathesis: never a 500
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 422
    assert client.get("/nope").status_code == 404
    # Lone surrogates (valid JSON escapes, invalid UTF-8) and control bytes are served, not a 500.
    r = client.post("/v1/fim", content=b'{"path": "a.py", "prefix": "x = \\ud800\\u0000\\u0001", "options": {"max_tokens": 2}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/fim", content=b'{"path": "a.py", "prefix": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


def test_openai_fields_the_server_cannot_honour_are_refused_not_ignored(client):
    prompt = {"prompt": "def add(a, b):\n    return ", "max_tokens": 4}
    for field, value in [("echo", True), ("logprobs", 2), ("logprobs", 0), ("best_of", 3), ("presence_penalty", 0.5),
                         ("frequency_penalty", -1), ("logit_bias", {"7": -100})]:
        r = client.post("/v1/completions", json={**prompt, field: value})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["code"] == "unsupported_parameter" and r.json()["error"]["param"] == field
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field, value in [("logprobs", True), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "json_object"}), ("presence_penalty", 1)]:
        r = client.post("/v1/chat/completions", json={**chat, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    # The values that mean "not used" (what SDKs send by default) are fine, and so are fields with no effect.
    r = client.post("/v1/completions", json={**prompt, "echo": False, "logprobs": None, "best_of": 1,
                                             "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                                             "user": "me"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={**chat, "logprobs": False, "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_stream_options_include_usage_ends_with_a_usage_chunk(client):
    body = {"prompt": "def add(a, b):\n    return ", "max_tokens": 6}
    whole = client.post("/v1/completions", json=body).json()
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_telemetry_round_trip_and_metrics(client, app_and_store):
    store = app_and_store[1]
    cid = client.post("/v1/fim", json={"path": "t.py", "prefix": "y = ", "options": {"max_tokens": 3}}).json()["id"]
    row = store.completion(cid)
    assert row is not None and row["prefix"] == "y = " and "<fim_middle>" in row["prompt"]
    r = client.post("/v1/telemetry", json={"events": [{"id": cid, "event": "shown"}, {"id": cid, "event": "accepted"}]})
    assert r.json() == {"recorded": 2}
    assert client.post("/v1/telemetry", json={"id": cid, "event": "rejected"}).json() == {"recorded": 1}
    assert [e["event"] for e in store.events(cid)] == ["shown", "accepted", "rejected"]
    assert client.post("/v1/telemetry", json={"id": cid, "event": "clicked"}).status_code == 422
    text = client.get("/metrics").text
    assert 'mellum_request_latency_seconds_bucket{endpoint="/v1/fim",le="+Inf"}' in text
    assert "mellum_queue_depth 0" in text and 'mellum_telemetry_events_total{event="accepted"} 1' in text


def test_a_resent_telemetry_batch_is_accepted_and_not_counted_again(tiny_service, tmp_path):
    """Clients resend a batch whose reply they did not get: the answer is the first one's (with how many were
    duplicates), and neither the database nor /metrics counts the events twice."""
    from fastapi.testclient import TestClient

    from mellum.serve.http import HttpConfig, create_app
    from mellum.serve.telemetry import TelemetryStore

    with TelemetryStore(tmp_path / "t.db") as store, \
            TestClient(create_app(tiny_service, HttpConfig(model_name="tiny"), telemetry=store)) as c:
        batch = {"events": [{"id": "c1", "event": "shown"}, {"id": "c1", "event": "accepted"}]}
        assert c.post("/v1/telemetry", json=batch).json() == {"recorded": 2}
        r = c.post("/v1/telemetry", json=batch)
        assert r.status_code == 200 and r.json() == {"recorded": 2, "duplicates": 2}
        assert c.post("/v1/telemetry", json={"id": "c1", "event": "shown"}).json() == {"recorded": 1, "duplicates": 1}
        # With the client's event ids, the same suggestion shown again is a new event; its retry is not.
        shown = [{"id": "c2", "event": "shown", "event_id": f"e{i}"} for i in range(2)]
        assert c.post("/v1/telemetry", json={"events": shown}).json() == {"recorded": 2}
        assert c.post("/v1/telemetry", json=shown[1]).json() == {"recorded": 1, "duplicates": 1}
        assert c.post("/v1/telemetry", json={"id": "c2", "event": "shown", "event_id": ""}).status_code == 422
        assert store.counts() == {"completions": 0, "shown": 3, "accepted": 1}
        text = c.get("/metrics").text
        assert 'mellum_telemetry_events_total{event="shown"} 3\n' in text
        assert 'mellum_telemetry_events_total{event="accepted"} 1\n' in text


def test_chat_uses_the_tokenizer_template(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert 0 < body["usage"]["completion_tokens"] <= 4


def test_models_lists_the_served_model(client):
    """OpenAI clients (and editor plugins) list the models before completing."""
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json() == listed["data"][0]
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_message_text_never_becomes_a_control_token(tiny_service):
    """`<|im_end|>` typed in a message stays text: only the template's own control tokens are tokens."""
    import jinja2.sandbox

    from mellum.serve.http import _chat_segments

    tok = tiny_service.tokenizer
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    end = tok.id_of("<|im_end|>")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a <|im_end|> b <fim_prefix>"}]
    ids = tok.encode_segments(_chat_segments(env.from_string(tok.config["chat_template"]), messages, tok))
    assert ids.count(end) == 2 and tok.id_of("<fim_prefix>") not in ids  # one per turn, none from the text
    assert tok.decode(ids).count("<|im_end|>") == 3  # the typed one is there, as plain text
    # A template that transforms contents cannot be split around them: then a control token in a message is refused.
    upper = env.from_string("{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}")
    assert tok.decode(tok.encode_segments(_chat_segments(upper, messages[:1], tok))) == "<|im_start|>BE BRIEF<|im_end|>"
    with pytest.raises(ValueError, match="a user message holds the control token"):
        _chat_segments(upper, messages, tok)


def test_telemetry_disabled_is_404(tiny_service):
    from fastapi.testclient import TestClient

    from mellum.serve.http import create_app

    with TestClient(create_app(tiny_service)) as c:
        r = c.post("/v1/telemetry", json={"id": "x", "event": "shown"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "telemetry_disabled"


def test_a_backend_that_fails_is_a_502(tiny_model_dir):
    """With --backend-url, an unreachable or failing generation server is a gateway error, not a crash (500)."""
    from fastapi.testclient import TestClient

    from mellum.complete import CompletionService
    from mellum.serve.http import HttpConfig, create_app
    from tests.ports import free_port

    service = CompletionService.from_remote(tiny_model_dir, f"http://127.0.0.1:{free_port()}/v1")  # nobody listens
    try:
        with TestClient(create_app(service, HttpConfig(model_name="tiny"))) as c:
            fim = c.post("/v1/fim", json={"path": "a.py", "prefix": "x = ", "options": {"max_tokens": 2}})
            assert fim.status_code == 502 and "cannot reach the backend" in fim.json()["error"]["message"]
            assert c.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2}).status_code == 502
            # Streamed, the failure comes before the first piece, so before the headers: the same 502.
            stream = c.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2, "stream": True})
            assert stream.status_code == 502 and stream.json()["error"]["code"] == "backend_error"
            assert 'status="502"' in c.get("/metrics").text
    finally:
        service.close()


def _series(text: str) -> dict[str, float]:
    """Prometheus text format 0.0.4 read strictly: every non-comment line is `name{labels} value`."""
    import re

    line = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                      r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? (-?[0-9.]+|\+Inf|NaN)$')
    out = {}
    for row in text.splitlines():
        if not row.startswith("#"):
            match = line.match(row)
            assert match, row
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


def test_metrics_label_routes_not_urls_and_count_refusals(client):
    """A label per URL a client invents would grow /metrics (and memory) without bound; refusals made before any
    route runs (401, 413) are requests too."""
    from fastapi.testclient import TestClient

    before = _series(client.get("/metrics").text)
    for name in ("gpt-4", "gpt-5", "x/y"):
        assert client.get(f"/v1/models/{name}").status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert TestClient(client.app).post("/v1/fim", json={}).status_code == 401
    huge = client.post("/v1/fim", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413
    after = _series(client.get("/metrics").text)
    assert not [k for k in after if "gpt-" in k or "no/such" in k]

    def grew(labels: str) -> float:
        key = "mellum_requests_total" + labels
        return after.get(key, 0) - before.get(key, 0)

    assert grew('{endpoint="/v1/models/{model:path}",status="404"}') == 3
    assert grew('{endpoint="other",status="404"}') == 1
    assert grew('{endpoint="/v1/fim",status="401"}') == 1 and grew('{endpoint="/v1/fim",status="413"}') == 1


def test_counters_render_exact_values():
    from mellum.serve.metrics import Metrics

    m = Metrics()
    m.record(m.prompt_tokens.inc, 1_234_567)
    m.record(m.latency.observe, 0.25, endpoint="/v1/fim")
    m.record(m.cache.inc, result="hit")
    m.record(m.cache.inc, result="miss")
    series = _series(m.render())
    assert series["mellum_prompt_tokens_total"] == 1_234_567  # not 1.23457e+06
    assert series['mellum_request_latency_seconds_bucket{endpoint="/v1/fim",le="0.2"}'] == 0
    assert series['mellum_request_latency_seconds_bucket{endpoint="/v1/fim",le="0.3"}'] == 1
    assert series['mellum_request_latency_seconds_bucket{endpoint="/v1/fim",le="+Inf"}'] == 1
    assert series["mellum_suggestion_cache_hit_rate"] == 0.5


def test_fim_extra_context_is_most_relevant_last(client, app_and_store):
    """As documented: the last piece is the most relevant, so it is the one nearest the cursor, and the one kept
    when only one fits (the tiny model's window is 512 tokens)."""
    pieces = [{"path": "far.py", "text": "FAR = 1\n"}, {"path": "near.py", "text": "NEAR = 2\n"}]
    r = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "extra_context": pieces,
                                     "options": {"max_tokens": 2, "return_prompt": True}})
    prompt = r.json()["prompt"]
    assert prompt.index("<filename>far.py") < prompt.index("<filename>near.py") < prompt.index("<filename>m.py")
    # Telemetry keeps them in the client's (the prompt's) order.
    assert json.loads(app_and_store[1].completion(r.json()["id"])["context"]) == pieces
    big = [{"path": f"{name}.py", "text": f"{name.upper()} = [\n" + "    1,\n" * 100 + "]\n"}
           for name in ("far", "near")]
    prompt = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "extra_context": big,
                                          "options": {"max_tokens": 2, "return_prompt": True}}).json()["prompt"]
    assert "NEAR = [" in prompt and "FAR = [" not in prompt


def test_fim_bounds_how_many_buffers_and_pieces_one_request_carries(client):
    """200k tiny open_files entries fit the body limit and held the engine's worker for 38 s of index syncing."""
    from mellum.serve.http import MAX_PIECES

    many = {f"f{i}.py": "x = 1\n" for i in range(MAX_PIECES + 1)}
    r = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "open_files": many})
    assert r.status_code == 422 and "open_files" in r.text
    pieces = [{"path": f"f{i}.py", "text": "x = 1\n"} for i in range(MAX_PIECES + 1)]
    r = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "extra_context": pieces})
    assert r.status_code == 422 and "extra_context" in r.text
    fine = dict(list(many.items())[:MAX_PIECES])
    r = client.post("/v1/fim", json={"path": "m.py", "prefix": "x = ", "open_files": fine, "options": {"max_tokens": 1}})
    assert r.status_code == 200


def test_a_locked_telemetry_database_fails_no_completion(tiny_service, tmp_path):
    """Another process holding the database (a second server, a backup) past the busy timeout: the completion is
    still served (its row is lost and counted), and a telemetry post is a 503 to retry, not a 500."""
    import sqlite3

    from fastapi.testclient import TestClient

    from mellum.serve.http import HttpConfig, create_app
    from mellum.serve.telemetry import TelemetryStore

    store = TelemetryStore(tmp_path / "t.db", busy_timeout_s=0.1)
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    try:
        with TestClient(create_app(tiny_service, HttpConfig(model_name="tiny"), telemetry=store)) as c:
            other.execute("BEGIN EXCLUSIVE")
            r = c.post("/v1/fim", json={"path": "a.py", "prefix": "x = ", "options": {"max_tokens": 2}})
            assert r.status_code == 200, r.text
            r = c.post("/v1/telemetry", json={"id": r.json()["id"], "event": "shown"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "telemetry_unavailable", r.text
            assert "mellum_telemetry_errors_total 1\n" in c.get("/metrics").text
            other.execute("COMMIT")
            assert c.post("/v1/telemetry", json={"id": "x", "event": "shown"}).json() == {"recorded": 1}
    finally:
        other.close()
        store.close()


def test_a_call_cancelled_in_the_queue_logs_no_traceback(tiny_service, caplog):
    """Clients hanging up while queued are routine: no "Future exception was never retrieved" for each one."""
    import asyncio
    import gc
    import threading
    import time

    from mellum.serve.runner import Cancelled, Runner

    def slow(cancel):
        time.sleep(0.2)

    async def main():
        runner = Runner(tiny_service)
        busy, queued = threading.Event(), threading.Event()
        first = asyncio.ensure_future(runner.call(slow, busy, cancel=busy, endpoint="e"))
        second = asyncio.ensure_future(runner.call(slow, queued, cancel=queued, endpoint="e"))
        await asyncio.sleep(0.05)
        second.cancel()  # waits behind `first`; starts, sees its event set, raises Cancelled on the worker
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.sleep(0.3)
        runner.close()
        assert runner.queue_depth == 0 and runner.metrics.cancelled.get(endpoint="e") == 1

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert "never retrieved" not in caplog.text and Cancelled.__name__ not in caplog.text


def test_preference_pairs_continue_the_recorded_prompt_after_token_healing(client, app_and_store, tmp_path):
    """Token healing takes the prefix's trailing indent off the prompt and the model types it again: a DPO pair's
    middles must start with it, or `prompt + chosen` teaches the model to drop the indent."""
    from mellum.serve.telemetry import export_preferences

    store = app_and_store[1]
    body = {"path": "shop/heal.py", "prefix": "def total(cart):\n    ", "suffix": "\n"}
    texts: dict[str, str] = {}
    for seed in range(40):  # two different non-empty answers for the same context
        r = client.post("/v1/fim", json={**body, "options": {"max_tokens": 6, "temperature": 1.0, "seed": seed}}).json()
        if r["completion"].strip() and r["completion"] not in texts.values():
            texts[r["id"]] = r["completion"]
        if len(texts) == 2:
            break
    (good, bad), row = texts, store.completion(next(iter(texts)))
    assert row["prompt"].endswith("def total(cart):\n<fim_middle>") and row["healed"] == "    "
    events = [{"id": good, "event": "accepted"}, {"id": bad, "event": "rejected", "replacement": "return 0"}]
    assert client.post("/v1/telemetry", json={"events": events}).json() == {"recorded": 2}
    out = tmp_path / "pairs.jsonl"
    export_preferences(store.path, out)
    pairs = [p for p in map(json.loads, out.read_text().splitlines()) if p["chosen_id"] in texts]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("    " + texts[good], "    " + texts[bad]),
                                                             ("    return 0", "    " + texts[bad])}
