"""The remote backend against llama.cpp's own HTTP server: the bundled model exported with `mellum export gguf`,
served by `llama-server`, completes the sample project's cursors exactly as the in-process engine does.

llama-server is not installed by setup (llama.cpp builds from source for minutes): the test runs where
`$LLAMA_SERVER` names the executable or `llama-server` is on PATH, and is skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.ports import free_port

EXECUTABLE = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
pytestmark = pytest.mark.skipif(not EXECUTABLE or not Path(EXECUTABLE).is_file(),
                                reason="llama-server not found ($LLAMA_SERVER or PATH)")
pytest.importorskip("gguf")
pytest.importorskip("httpx")

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_project"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    import httpx

    from mellum.assets import default_model_dir
    from mellum.gguf import export_gguf

    path = tmp_path_factory.mktemp("gguf") / "mellum-tiny-f32.gguf"
    export_gguf(default_model_dir(), path, "f32", progress=False)
    port = free_port()
    # fp32 KV cache, one slot: the same arithmetic as the in-process engine's default (exact greedy tokens).
    process = subprocess.Popen([EXECUTABLE, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-c", "1024",
                                "-t", "2", "-np", "1", "-ctk", "f32", "-ctv", "f32"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"llama-server exited: {process.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 60 s"
            time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_completions_over_llama_server_equal_the_in_process_engine(llama_server):
    from mellum.assets import default_model_dir
    from mellum.complete import CompletionRequest, CompletionService

    local = CompletionService.from_pretrained(default_model_dir())
    remote = CompletionService.from_remote(default_model_dir(), llama_server, model="mellum-tiny")
    try:
        compared = 0
        for file in sorted(SAMPLE.rglob("*.py"))[:4]:
            text = file.read_text(encoding="utf-8")
            for cut in (len(text) // 3, 2 * len(text) // 3):
                cut = text.index("\n", cut) + 1  # the start of a line: a multi-line completion
                request = CompletionRequest(path=str(file.relative_to(SAMPLE)), prefix=text[:cut] + "    ",
                                            suffix=text[cut:], project_root=str(SAMPLE), max_new_tokens=24)
                want, got = local.complete(request), remote.complete(request)
                assert got.text == want.text, (file.name, cut)
                assert got.prompt_tokens == want.prompt_tokens
                compared += bool(want.text.strip())
        assert compared >= 4  # most cursors produced a non-empty completion to compare
        # A special token (streamed by llama-server as empty text) still arrives as its id: forced first, it stops.
        from mellum.engine import SamplingParams

        filename = local.tokenizer.id_of("<filename>")
        forced = remote.engine.generate(list(range(100, 140)), SamplingParams(max_new_tokens=4, stop_ids=(filename,),
                                                                                allowed_first_ids=[filename]))
        assert forced.tokens == [] and forced.stop_reason == "stop"
        text = (SAMPLE / "shop" / "pricing.py").read_text(encoding="utf-8")
        code = local.tokenizer.encode(text[:text.index("return ") + len("return ")])  # mid-statement
        params = SamplingParams(max_new_tokens=16, stop_ids=(local.tokenizer.eos_id,))  # llama-server stops there too
        free = remote.engine.generate(code, params)
        assert free.tokens == local.engine.generate(code, params).tokens and len(free.tokens) > 0
    finally:
        local.close(), remote.close()
