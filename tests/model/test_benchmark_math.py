"""The arithmetic and option checks of the benchmark scripts (benchmarks/), without running a benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mellum.config import get_config
from mellum.model import Transformer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_flops_count_windows_mtp_and_a_tied_head():
    """Model FLOPs per token written out from tiny-moe's shape: 4 layers (sliding, sliding, sliding, full; window 16;
    dense, sparse, sparse, sparse), 4 query heads and 2 key/value heads of 16 dims, 8 experts of width 32, top-2,
    and one MTP layer (sliding, sparse) that runs only with the MTP loss."""
    flops = benchmark("train_throughput").model_flops_per_token
    with torch.device("meta"):
        moe = Transformer(get_config("tiny-moe"))
    c, t = 64, 64
    attn = c * 64 + 2 * c * 32 + 64 * c  # q, k, v, o
    dense, sparse = 3 * c * 128, 8 * c + 2 * 3 * c * 32  # SwiGLU; router + the 2 experts a token runs through
    head = 1024 * c
    main = 4 * attn + dense + 3 * sparse + head
    mtp = 2 * c * c + attn + sparse + head  # fc, its layer, the shared head once more
    keys = 3 * 16 + t  # a sliding layer's query sees 16 keys, the full layer's all 64
    assert flops(moe, t) == 6 * main + 12 * keys * c
    assert flops(moe, t, mtp=True) == 6 * (main + mtp) + 12 * (keys + 16) * c
    causal_keys = 3 * (16 - 16 * 16 / (2 * t)) + t / 2  # the mean over queries of the keys at or before them
    assert flops(moe, t, causal=True) == pytest.approx(6 * main + 12 * causal_keys * c)
    # A tied head is the embedding's weight, but the output product is still done.
    with torch.device("meta"):
        tied = Transformer(get_config("tiny-dense").replace(tie_word_embeddings=True))
    per_layer = c * 64 + 2 * c * 32 + 64 * c + 3 * c * 128
    assert flops(tied, t) == 6 * (2 * per_layer + 1024 * c) + 12 * 2 * t * c


@pytest.mark.parametrize("argv, message", [
    (["--shape", "mellum-5b"], "unknown --shape mellum-5b"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--fim-tokens", "-5"], "--fim-tokens must be at least 1"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 1"),
    (["--cold-keystrokes", "0"], "--cold-keystrokes must be at least 1"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be 0"),
    (["--device", "tpu"], "--device is cpu or cuda"),
])
def test_engine_benchmark_refuses_bad_options_before_running(argv, message, capsys):
    parse_args = benchmark("engine").parse_args
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
    args = parse_args(["--shape", "tiny-moe", "--shape", "mellum2-cpu", "--prefix-cache-mb", "0"])
    assert args.shape == ["tiny-moe", "mellum2-cpu"] and args.prefix_cache_mb == 0


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget must be at least 1"),
    (["--root", "/no/such/project"], "is not a directory"),
])
def test_context_benchmark_refuses_bad_options_before_indexing(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark("context_speed").main(argv)
    assert message in capsys.readouterr().err
