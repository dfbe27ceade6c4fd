"""The decode step that CUDA graphs capture when the engine compiles (`compile=True`), checked on CPU, where dynamo
and Inductor trace the same Python as on a GPU: the whole layer loop is one graph (no graph breaks), shared by every
key-length bucket and by engines over same-shaped models, and its logits equal the eager step's within fp32
rounding. `tests/engine/test_cuda.py` replays it inside CUDA graphs where a GPU is present."""

import pytest
import torch
from torch._dynamo.utils import counters

from mellum.engine import NativeEngine, SamplingParams
from mellum.engine.cuda_graphs import make_experts_graph_safe
from mellum.engine.native import compiled_layer_loop, layer_loop
from tests.engine.helpers import repetitive_prompt, tiny_model


def gpu_like_engine(seed: int) -> NativeEngine:
    """A CPU engine whose layer loop is the one a GPU engine's graphs capture: plain products (split products are
    set up only with several threads), the experts' sync-free gathered form, no fused C++ decoder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = NativeEngine(tiny_model("tiny-moe", seed), speculative=None, prefix_cache_mb=0, fused_decode=False)
    finally:
        torch.set_num_threads(threads)
    make_experts_graph_safe(engine.model)
    return engine


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch
def test_compiled_step_is_one_graph_for_every_key_bucket_and_engine():
    torch._dynamo.reset()
    counters.clear()
    step = compiled_layer_loop()
    start = 100
    for seed in (0, 1):  # a second engine over another model of the same shape reuses the graphs
        engine = gpu_like_engine(seed)
        try:
            prompt = repetitive_prompt(engine.config.vocab_size, 300, seed)
            engine.generate(prompt, SamplingParams(max_new_tokens=1))  # cache row 0 holds the prompt's keys
            # A decode step (1 token, last logits) over three key buckets; a verify step (4 tokens, all logits).
            for t, buckets in ((1, (128, 256, 384)), (4, (128, 256))):
                ids = torch.tensor([prompt[start:start + t]])
                positions = torch.arange(start, start + t)[None]
                for kv in buckets:
                    with torch.inference_mode():
                        # Padded views, as the graphs use them: keys past the query are masked by their positions.
                        got, got_hidden = step(engine.model, ids, positions, engine.cache.view([0], kv, padded=True),
                                               t == 1)
                        want, want_hidden = layer_loop(engine.model, ids, positions,
                                                       engine.cache.view([0], kv, padded=True), t == 1)
                    assert got.shape == want.shape == (1, 1 if t == 1 else t, engine.config.vocab_size)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-4, atol=1e-4)
        finally:
            engine.close()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one for 1 token, one for several
