"""End-to-end fixtures: a tiny random model on disk and a small project for the servers to work in."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE_PROJECT = REPO / "examples" / "sample_project"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the sample project plus traps: a secrets file, and a symlink and a file outside the root."""
    base = tmp_path_factory.mktemp("ws")
    root = base / "project"
    shutil.copytree(SAMPLE_PROJECT, root)
    (root / ".env").write_text("API_TOKEN=sk-live-SECRET-IN-DOTENV\n")
    outside = base / "outside.py"
    outside.write_text("OUTSIDE_MARKER = 'SECRET-OUTSIDE-ROOT'\n")
    os.symlink(outside, root / "linked_outside.py")
    return root


def server_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


@contextlib.contextmanager
def serve_process(args: list[str], log_path: Path, wait_s: float):
    """`mellum serve ARGS` as a subprocess logging to `log_path`: (process, base URL) once /health answers; stopped
    with SIGINT (then killed) on exit unless a test ended it already."""
    import httpx

    from tests.ports import free_port

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([PYTHON, "-m", "mellum.cli", "serve", "--port", str(port), *args], env=server_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"server did not come up in {wait_s:.0f} s")
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
