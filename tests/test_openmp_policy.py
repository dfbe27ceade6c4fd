"""`import mellum` sets PyTorch's OpenMP wait policy (active, bounded spin) only when it can take effect and the user
has not chosen one (mellum/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SHOW = "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def policy(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", f"{code}; {SHOW}"], cwd=REPO_ROOT, env={**base, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("code, env, want", [
    ("import mellum", {}, "ACTIVE 300000"),  # set before torch loads
    ("import mellum, torch", {}, "ACTIVE 300000"),
    ("import torch, mellum", {}, "None None"),  # too late: libgomp has read the environment
    ("import mellum", {"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),  # the user's choice stands
    ("import mellum", {"GOMP_SPINCOUNT": "1000"}, "None 1000"),
])
def test_import_sets_the_wait_policy_only_when_it_applies(code, env, want):
    assert policy(code, **env) == want
