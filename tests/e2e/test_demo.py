"""`mellum demo` end to end: it starts the language server, completes at its cursors and prints the results."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import PYTHON, server_env

pytestmark = pytest.mark.timeout(150)


def test_demo_prints_suggestions_with_timings(tiny_model_dir):
    done = subprocess.run([PYTHON, "-m", "mellum.cli", "demo", "--model", str(tiny_model_dir), "--no-color",
                           "--max-new-tokens", "8"], env=server_env(), capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for where in ("shop/pricing.py:", "shop/inventory.py:", "shop/models.py:"):
        assert where in out
    assert out.count("round trip") == 4 and "prompt tokens" in out
    assert "from the suggestion cache" in out
    assert "docs/editors.md" in out


def test_demo_missing_model_is_a_clear_error(tmp_path):
    done = subprocess.run([PYTHON, "-m", "mellum.cli", "demo", "--model", str(tmp_path)], env=server_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "mellum: error: no model at" in done.stderr
