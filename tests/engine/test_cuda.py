"""GPU paths (CUDA graphs, gathered experts) against the uncached reference, in fp32; skipped without CUDA."""

import pytest
import torch

from tests.engine.helpers import check_graphed_decoding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset, mode", [("tiny-dense", None), ("tiny-dense", "lookup"), ("tiny-moe", None),
                                          ("tiny-moe", "lookup"), ("tiny-moe", "mtp")])
def test_graphed_decoding_equals_uncached_greedy_on_cuda(preset, mode):
    check_graphed_decoding(preset, mode)
