"""Shared fixtures: a small BPE tokenizer trained on real code (the standard library), paths to shared data."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SHARED_BENCHMARKS = Path(os.environ.get("MELLUM_BENCHMARKS", REPO_ROOT.parent / "shared" / "benchmarks"))

# Real Python files to train the test tokenizer on: small, stable modules of the standard library.
_TOKENIZER_TRAIN_FILES = ["argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "dataclasses.py", "functools.py"]


def hub_cache(root: Path, model_dir: Path, repo_id: str) -> dict[str, str]:
    """Lay `model_dir` out under `root` as huggingface_hub caches a download of `repo_id`; the environment under
    which a subprocess finds it offline."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("abc123")
    return dict(os.environ, HF_HUB_CACHE=str(root), HF_HUB_OFFLINE="1")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 1,024-token byte-level BPE with the Mellum special tokens, trained on a few stdlib modules."""
    from mellum.tokenizer import train_bpe

    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in _TOKENIZER_TRAIN_FILES]
    return train_bpe(texts, vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A randomly initialised `tiny-dense` model (seed 0) saved with the tiny tokenizer: real tensors end to end."""
    import torch

    import mellum
    from mellum.config import get_config
    from mellum.model import Transformer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-model")
    mellum.save_pretrained(Transformer(get_config("tiny-dense")).float(), path)
    tiny_tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_BENCHMARKS} (set MELLUM_BENCHMARKS)")
    return SHARED_BENCHMARKS
