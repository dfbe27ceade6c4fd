"""GPU paths (CUDA graphs, of the eager or the compiled step; gathered experts) against the uncached reference, in fp32; skipped without CUDA."""

import pytest
import torch

from tests.engine.helpers import check_graphed_decoding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset, mode", [("tiny-dense", None), ("tiny-dense", "lookup"), ("tiny-moe", None),
                                          ("tiny-moe", "lookup"), ("tiny-moe", "mtp")])
def test_graphed_decoding_equals_uncached_greedy_on_cuda(preset, mode):
    check_graphed_decoding(preset, mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch
@pytest.mark.parametrize("preset, mode", [("tiny-dense", None), ("tiny-moe", "lookup")])
def test_graphs_of_the_compiled_step_equal_uncached_greedy_on_cuda(preset, mode):
    """compile=True: the graphs capture the layer loop under torch.compile (tests/engine/test_compiled_step.py
    checks on CPU that it is one graph for every key bucket)."""
    check_graphed_decoding(preset, mode, compile=True)
