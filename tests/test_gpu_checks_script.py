"""`scripts/gpu_checks.sh` on a CPU: stages under one deadline, a log per stage, failures recorded, the summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_checks_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE": "cpu", "WORK": str(tmp_path / "work"),
           "SITE": str(tmp_path / "site"), "WHEELS": str(tmp_path / "no-wheels"),
           "STAGES": "test_cuda train train_fp8"}
    result = subprocess.run(["scripts/gpu_checks.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    assert sorted(p.name for p in out.iterdir()) == ["summary.md", "test_cuda.log", "train.log", "train_fp8.log"]
    assert "| test_cuda | ok |" in summary and "| train | ok |" in summary
    # One row per accumulation, each with its optimizer step split into forward/backward and the optimizer.
    assert "| mellum-tiny-cpu | fp32 | 64 × 2 × 1 |" in summary and "| mellum-tiny-cpu | fp32 | 64 × 2 × 2 |" in summary
    assert re.search(r"\| 64 × 2 × 2 \| [\d,]+ \| [\d.]+ \+ [\d.]+ \| [\d.]+ \| [\d.]+% \| [\d.]+% \|", summary), summary
    # --fp8 on a CPU stops at once with the trainer's message, recorded as this stage's failure.
    assert "| train_fp8 | failed (rc 2) |" in summary
    assert "fp8 training needs a CUDA GPU" in (out / "train_fp8.log").read_text()
    # The deadline: a stage that no longer fits in it is skipped, not started.
    env.update(DEADLINE_S="30", STAGES="engine_4b")
    result = subprocess.run(["scripts/gpu_checks.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| engine_4b | skipped | 0 | 60 | only " in summary and " s left before the deadline |" in summary
