"""End-to-end fixtures: a tiny random model on disk and a small project for the servers to work in."""

from __future__ import annotations

import os
import shutil
import sys
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
