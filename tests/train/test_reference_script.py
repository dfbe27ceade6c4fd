"""`scripts/reference_model.sh gpu` end to end on CPU: corpus → held-out split → shards → baseline → training with
best-checkpoint export → packed parts, on a small licensed project and a few seconds of training."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, STDLIB

MIT_LICENSE = REPO_ROOT / "tests" / "data" / "fixtures" / "mit_project" / "LICENSE"
SMALL_RUN = ("--set seq_len=128 --set micro_batch=4 --set batch_ramp=8 --set eval_batches=2 --set eval_every=2 "
             "--set compile=False --set checkpoint_every=0")


def _held_out_name(name: str) -> str:
    """A folder for `name` that puts it among the files `split_corpus` holds out (crc32 of project/path % 100 == 0)."""
    return next(f"{k}/{name}" for k in (f"part{i}" for i in range(10_000))
                if zlib.crc32(f"proj/{k}/{name}".encode()) % 100 == 0)


def _project(root: Path) -> Path:
    """An MIT-licensed project of 60 standard-library modules, two of them in folders that are held out."""
    project = root / "proj"
    project.mkdir()
    shutil.copy(MIT_LICENSE, project / "LICENSE")
    modules = sorted(p for p in STDLIB.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:60]
    for i, path in enumerate(modules):
        target = project / (_held_out_name(path.name) if i < 2 else path.name)
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
    return project


@pytest.mark.slow
def test_gpu_target_runs_through_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "REF": str(tmp_path / "ref"), "OUT": str(out), "DEVICE": "cpu",
           "TOKENIZER": "mellum/assets/mellum-tiny", "SOURCES": f"code={_project(tmp_path)}", "WORKERS": "2",
           "MINUTES": "0.05", "EXTRA": SMALL_RUN, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["scripts/reference_model.sh", "gpu"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout
    held_out = int(re.search(r"corpus-heldout: (\d+) files", log).group(1))
    assert held_out >= 2 and "baseline: the bundled mellum/assets/mellum-tiny scores" in log
    assert "exported: step" in log and "timings (s): packages" in log
    # The packed model: ≤ 15 MiB parts with checksums, and the whole log beside them.
    parts = sorted(out.glob("mellum-tiny.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    subprocess.run(["sha256sum", "-c", "mellum-tiny.SHA256SUMS"], cwd=out, check=True, capture_output=True)
    assert "timings (s):" in (out / "reference_gpu.log").read_text()
    listing = subprocess.run(f"cat {out}/mellum-tiny.tar.part-* | tar -tf -", shell=True, check=True,
                             capture_output=True, text=True).stdout.split()
    assert {"mellum-tiny/config.json", "mellum-tiny/tokenizer.json", "mellum-tiny/training_log.jsonl",
            "mellum-tiny/data_report.md"} <= set(listing)
