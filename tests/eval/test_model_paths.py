"""The real model paths: a tiny random model through the completion service (scores ~0, the pipeline is real),
and the same model behind a real `mellum serve` process reached as an OpenAI-compatible server (+ latency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from mellum.eval import runner
from mellum.eval.completer import NativeCompleter, OpenAICompleter
from mellum.eval.report import summarize
from mellum.eval.sandbox import Sandbox
from mellum.eval.tasks import get_benchmark
from mellum.eval.tasks.latency import LatencyConfig, measure
from tests.ports import free_port


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_native_model_runs_a_benchmark(shared_benchmarks, model_dir, tmp_path):
    bench = get_benchmark("humaneval-infilling", shared_benchmarks, "single-line")
    bench.max_new_tokens = 8
    completer = NativeCompleter(model_dir)
    try:
        records = runner.run(bench, completer, tmp_path / "r.jsonl", runner.RunConfig(limit=2), Sandbox(), progress=False)
        again = runner.run(bench, completer, tmp_path / "r2.jsonl", runner.RunConfig(limit=2), Sandbox(), progress=False)
    finally:
        completer.close()
    assert len(records) == 2
    for record in records:
        text = record["completions"][0]
        assert isinstance(text, str) and text.count("\n") <= 1  # single-line holes get one line
        assert record["results"][0]["reason"] or record["passed"] == 1  # a failure always says why
    assert [r["completions"] for r in records] == [r["completions"] for r in again]  # greedy is deterministic
    summary = summarize(records, bench.title)
    assert 0.0 <= summary["metrics"]["pass@1"]["value"] <= 1.0


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mellum.cli", "serve", "--model", str(model_dir), "--port", str(port), "--no-telemetry"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mellum serve exited: {proc.stderr.read().decode()[-800:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("mellum serve did not come up in 90 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_compatible_server_and_latency(shared_benchmarks, server, tmp_path):
    bench = get_benchmark("cceval", shared_benchmarks, "none")
    bench.max_new_tokens = 6
    records = runner.run(bench, OpenAICompleter(server), tmp_path / "r.jsonl", runner.RunConfig(limit=2), Sandbox(),
                         progress=False)
    assert len(records) == 2 and all(isinstance(r["completions"][0], str) for r in records)
    raw = OpenAICompleter(server, prompt_format="mellum")  # prompt rendered here, sent as plain text
    assert isinstance(raw.complete(bench.load()[0], bench, 0, runner.Sampling()), str)
    # The OpenAI base URL works too (it asked for .../v1/v1/completions: a 404).
    assert isinstance(OpenAICompleter(server + "/v1/").complete(bench.load()[0], bench, 0, runner.Sampling()), str)

    summary, samples = measure(LatencyConfig(url=server + "/v1", concurrency=(1, 2), requests=3, max_tokens=4, warmup=1),
                               shared_benchmarks)
    for level in summary["levels"]:
        assert level["errors"] == 0, level["first_error"]
        assert 0 < level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"]
    assert sorted(samples) == [1, 2] and all(len(v) == 3 for v in samples.values())
    json.dumps(summary)  # the summary is plain JSON

    from mellum import cli

    argv = ["eval", "latency", "--url", server, "--concurrency", "1", "--requests", "2", "--max-tokens", "2",
            "--warmup", "0", "--out", str(tmp_path / "lat"), "--json", str(tmp_path / "lat.json"),
            "--data", str(shared_benchmarks)]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "lat.json").read_text())["summaries"][0]["levels"][0]["errors"] == 0
    assert (tmp_path / "lat" / "latency" / "latency.png").is_file()


def test_unreachable_server_is_a_clear_error(shared_benchmarks):
    bench = get_benchmark("cceval", shared_benchmarks, "none")
    completer = OpenAICompleter(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="cannot reach"):
        completer.complete(bench.load()[0], bench, 0, runner.Sampling())
