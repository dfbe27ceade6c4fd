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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_failing_compiled_step_falls_back_to_graphs_of_the_eager_step(capsys):
    from mellum.engine import NativeEngine, SamplingParams
    from tests.engine.helpers import reference_greedy, repetitive_prompt, tiny_model

    model = tiny_model("tiny-dense")
    engine = NativeEngine(model, device="cuda", dtype=torch.float32, speculative=None, compile=True)

    def broken(*args):
        raise RuntimeError("compilation failed (a test's stand-in)")

    engine._graphs.step = broken
    try:
        prompt = repetitive_prompt(model.config.vocab_size, 50, 0)
        assert engine.generate(prompt, SamplingParams(max_new_tokens=12)).tokens == reference_greedy(model, prompt, 12)
        assert engine._graphs is not None and not engine._graphs.compiled and engine._graphs.graphs
        assert "capturing the eager step" in capsys.readouterr().out
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keystroke_prefill_chunks_replay_graphs_once_their_shape_recurs():
    """Each request adds three tokens to the previous prompt (the rest is still in the row): from the second such
    request on, its few-token prefill chunk replays a graph; tokens stay exact."""
    from mellum.engine import NativeEngine, SamplingParams
    from tests.engine.helpers import reference_greedy, repetitive_prompt, tiny_model

    model = tiny_model("tiny-moe")
    engine = NativeEngine(model, device="cuda", dtype=torch.float32, speculative=None)
    try:
        prompt = repetitive_prompt(model.config.vocab_size, 80, 1)
        for n in range(50, 80, 3):
            result = engine.generate(prompt[:n], SamplingParams(max_new_tokens=6))
            assert result.tokens == reference_greedy(model, prompt[:n], 6), n
        # Prefill chunks are the only multi-token forwards asking for the last logits alone (verify steps want all).
        assert any(t > 1 and last_only for (_, _, t, last_only) in engine._graphs.graphs)
    finally:
        engine.close()
