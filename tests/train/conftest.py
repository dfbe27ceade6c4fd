"""Fixtures of the training tests: real token shards of standard-library code (train and held-out files), and one
intra-op thread for the fine-tuning tests."""

from __future__ import annotations

import pytest

from tests.conftest import STDLIB

@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on two shared cores, one thread per process is many times faster than two
    fighting for them (the fine-tuning tests use it through `pytestmark`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Disjoint sets of real Python files: the held-out loss is measured on code the model never trained on.
TRAIN_FILES = ["argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "json/decoder.py", "json/encoder.py",
               "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py"]
HELDOUT_FILES = ["ast.py", "copy.py", "csv.py"]


def _write_shards(out, tokenizer, files):
    from mellum.data.shards import ShardWriter

    with ShardWriter(out, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id) as writer:
        for name in files:
            writer.add(tokenizer.encode((STDLIB / name).read_text(encoding="utf-8")))
    return out


@pytest.fixture(scope="session")
def code_shards(tmp_path_factory, tiny_tokenizer):
    """(train_dir, heldout_dir, tokenizer_dir) built with the project's shard writer and test tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    tokenizer_dir = root / "tokenizer"
    tiny_tokenizer.save(tokenizer_dir)
    return (str(_write_shards(root / "train", tiny_tokenizer, TRAIN_FILES)),
            str(_write_shards(root / "heldout", tiny_tokenizer, HELDOUT_FILES)), str(tokenizer_dir))


@pytest.fixture(scope="session")
def overfit_shards(tmp_path_factory, tiny_tokenizer, code_shards):
    """(train_dir, heldout_dir, tokenizer_dir) whose training data is one small file: at the tiny-cpu recipe's
    learning rate the held-out loss falls for about 10 steps, then rises as the model memorises the file."""
    root = tmp_path_factory.mktemp("overfit")
    return str(_write_shards(root / "train", tiny_tokenizer, ["bisect.py"])), code_shards[1], code_shards[2]
