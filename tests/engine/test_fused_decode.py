"""The fused CPU decode forward (csrc/decoder.cpp via mellum.engine.fused): the same logits, hidden states and cache
entries as the layer-by-layer forward, the same greedy tokens as uncached forwards, clear errors for bad calls, and
the cases it leaves to the layer-by-layer forward."""

import dataclasses
import threading

import pytest
import torch

from mellum.config import get_config
from mellum.engine import NativeEngine, SamplingParams, cpu_kernels
from mellum.engine.kernels import KernelChooser
from mellum.model import Transformer
from tests.engine.helpers import reference_greedy, repetitive_prompt, tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels._cpu_supported() is not None,
                                reason=f"{cpu_kernels._cpu_supported()}: the kernels are x86-64 AVX2")

# tiny-moe's attention (sliding window 16 on three of four layers, GQA, QK-norm, two rope bases) with dense MLPs and
# YaRN on the full layer: everything the fused forward supports besides tiny-dense's plain Llama.
SLIDING = dataclasses.replace(
    get_config("tiny-moe"), mlp_types=("dense",) * 4, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
    mtp_mlp_type="dense", rope_scaling={"factor": 4.0, "original_max_position_embeddings": 128})


def make_model(preset: str, seed: int = 0) -> Transformer:
    if preset == "sliding":
        torch.manual_seed(seed)
        return Transformer(SLIDING).eval()
    return tiny_model(preset, seed)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_kernels.load(), cpu_kernels.status()  # ./run setup builds them; on a supported CPU they must load


class Recording:
    """Wraps an engine's FusedDecoder and records the [B, T] shape and the thread setting of every call it runs."""

    def __init__(self, engine):
        self.inner, self.shapes, self.one_thread = engine._fused, [], []
        self.max_run, self.fits = self.inner.max_run, self.inner.fits
        engine._fused = self

    def __call__(self, ids, rows, starts, last_only, one_thread=False):
        self.shapes.append(tuple(ids.shape))
        self.one_thread.append(one_thread)
        return self.inner(ids, rows, starts, last_only, one_thread)


def snapshot(engine):
    return [(layer.k.clone(), layer.v.clone(), layer.pos.clone()) for layer in engine.cache.layers]


def restore(engine, state):
    for layer, (k, v, pos) in zip(engine.cache.layers, state):
        layer.k.copy_(k), layer.v.copy_(v), layer.pos.copy_(pos)


@pytest.mark.parametrize("preset", ["tiny-dense", "sliding", "tiny-moe"])
@pytest.mark.parametrize("quantize,kv", [(None, None), ("int8", None), (None, "float16"), ("int8", "float16")])
@pytest.mark.parametrize("lengths,new", [([40], 1), ([40], 5), ([7], 16), ([70, 3, 25], 1), ([33, 50], 2)])
@torch.inference_mode()
def test_fused_forward_equals_the_layer_by_layer_forward(preset, quantize, kv, lengths, new):
    """Rows prefilled to different lengths (past the window of 16), then `new` tokens each: logits, hidden states
    and every cache entry (keys, values, stored positions) as the layer-by-layer forward computes them, with an
    fp32 or an fp16 KV cache."""
    engine = NativeEngine(make_model(preset), speculative=None, prefix_cache_mb=0, max_batch=3, quantize=quantize,
                          max_seq_len=256, kv_dtype=kv)
    tol = 1e-4 if kv is None else 2e-3  # fp16 entries: a 1e-6 difference can round to the neighbouring fp16 value
    try:
        assert engine.cache.layers[0].k.dtype == (torch.float16 if kv else torch.float32)
        assert engine.fused_status == "in use"
        g = torch.Generator().manual_seed(sum(lengths) + new)
        rows = list(range(len(lengths)))
        for row, n in zip(rows, lengths):  # prefill each row with the layer-by-layer forward
            ids = torch.randint(0, 1024, (1, n), generator=g)
            engine._layers_forward(ids, torch.arange(n)[None], engine.cache.view([row], n, fresh=True), True)
        ids = torch.randint(0, 1024, (len(rows), new), generator=g)
        positions = torch.tensor(lengths)[:, None] + torch.arange(new)  # [B, T]
        before = snapshot(engine)
        view = engine.cache.view(rows, max(lengths) + new)
        want_logits, want_hidden = engine._layers_forward(ids, positions, view, last_only=False)
        want_cache = snapshot(engine)
        restore(engine, before)
        assert engine._fused.fits(ids)
        logits, hidden = engine._fused(ids, rows, lengths, last_only=False)
        last, _ = engine._fused(ids, rows, lengths, last_only=True)  # writes the same entries again
        # On one thread (the kernel chooser's busy-machine setting) every loop splits the same way: the same bits.
        alone, alone_hidden = engine._fused(ids, rows, lengths, last_only=False, one_thread=True)
        assert torch.equal(alone, logits) and torch.equal(alone_hidden, hidden)
        torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)
        torch.testing.assert_close(hidden, want_hidden, rtol=tol, atol=tol)
        torch.testing.assert_close(last, want_logits[:, -1:], rtol=tol, atol=tol)
        for (k, v, pos), (wk, wv, wpos) in zip(snapshot(engine), want_cache):
            assert torch.equal(pos, wpos)
            torch.testing.assert_close(k, wk, rtol=tol, atol=tol)
            torch.testing.assert_close(v, wv, rtol=tol, atol=tol)
    finally:
        engine.close()


@pytest.mark.parametrize("preset", ["sliding", "tiny-moe"])
@pytest.mark.parametrize("quantize,kv", [(None, None), ("int8", "float16")])
@pytest.mark.parametrize("n", [1, 3])
@torch.inference_mode()
def test_fused_mtp_layer_equals_the_layer_by_layer_mtp_layer(preset, quantize, kv, n):
    """The MTP draft layer through its own fused decoder (forward_hidden: the combined embedding and hidden state
    as the first layer's input, cache layer num_layers, the MTP norm, the shared head): the logits at the last
    position, the output hidden state and the MTP cache entries of the layer-by-layer MTP forward."""
    engine = NativeEngine(make_model(preset), speculative="mtp", prefix_cache_mb=0, max_batch=2, quantize=quantize,
                          max_seq_len=256, kv_dtype=kv)
    tol = 1e-4 if kv is None else 2e-3
    try:
        assert engine._fused_mtp is not None
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, 1024, (1, 40), generator=g)
        _, hidden = engine._layers_forward(ids, torch.arange(40)[None], engine.cache.view([1], 40, fresh=True), False)
        engine._mtp(hidden[:, :30], ids[0, 1:31].tolist(), 0, 1)  # the MTP layer's cache up to position 29
        before = snapshot(engine)
        fused = engine._mtp(hidden[:, 30:30 + n], ids[0, 31:31 + n].tolist(), 30, 1)
        fused_cache = snapshot(engine)[-1]
        restore(engine, before)
        engine._parallel = False  # the fused MTP layer on one thread: the same bits
        restore(engine, before)
        alone = engine._mtp(hidden[:, 30:30 + n], ids[0, 31:31 + n].tolist(), 30, 1)
        assert torch.equal(alone[0], fused[0]) and torch.equal(alone[1], fused[1])
        restore(engine, before)
        engine._fused_mtp, kept = None, engine._fused_mtp
        want = engine._mtp(hidden[:, 30:30 + n], ids[0, 31:31 + n].tolist(), 30, 1)
        engine._fused_mtp = kept
        torch.testing.assert_close(fused[0], want[0], rtol=tol, atol=tol)  # logits [V]
        torch.testing.assert_close(fused[1], want[1], rtol=tol, atol=tol)  # hidden [1, 1, C]
        for got, expected in zip(fused_cache, snapshot(engine)[-1]):
            torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
        assert fused[0].shape == (1024,) and fused[1].shape == (1, 1, engine.config.hidden_size)
    finally:
        engine.close()


@pytest.mark.parametrize("preset,speculative", [("tiny-dense", None), ("tiny-dense", "lookup"), ("sliding", None),
                                                ("sliding", "lookup"), ("sliding", "mtp"), ("tiny-moe", None),
                                                ("tiny-moe", "mtp")])
def test_greedy_tokens_equal_uncached_forwards(preset, speculative):
    """Decode steps, verifies of prompt-lookup and MTP drafts, and the keystroke-sized prefill chunks of requests that
    reuse a row all run fused; the tokens are those of full forwards without a cache (prompts past the window)."""
    reference = make_model(preset)
    engine = NativeEngine(make_model(preset), speculative=speculative, prefix_cache_mb=8, max_seq_len=256)
    calls = Recording(engine)
    try:
        prompt = repetitive_prompt(1024, 60, seed=1)
        for step in range(6):  # a growing prefix: later requests reuse the row and prefill a few tokens
            prompt = prompt + repetitive_prompt(1024, 3, seed=10 + step)
            got = engine.generate(prompt, SamplingParams(max_new_tokens=24)).tokens
            assert got == reference_greedy(reference, prompt, len(got)), f"request {step}"
        assert len(calls.shapes) > 24 and any(t > 1 for _, t in calls.shapes)  # verify steps and short chunks too
    finally:
        engine.close()


@pytest.mark.parametrize("quantize,kv", [("int8", None), (None, "float16"), ("int8", "float16")])
def test_tokens_equal_the_layer_by_layer_engine(quantize, kv):
    """int8 weights and fp16 KV caches are not exact against an fp32 forward; fused and layer by layer they agree."""
    prompts = [repetitive_prompt(1024, n, seed=n) for n in (20, 45, 90)]
    results = []
    for fused in (True, False):
        engine = NativeEngine(make_model("sliding"), speculative="lookup", prefix_cache_mb=0, quantize=quantize,
                              fused_decode=fused, kv_dtype=kv)
        try:
            assert (engine._fused is not None) == fused
            results.append([engine.generate(p, SamplingParams(max_new_tokens=20)).tokens for p in prompts])
        finally:
            engine.close()
    assert results[0] == results[1]


def test_steps_the_kernel_chooser_runs_on_one_thread_give_the_same_tokens():
    """On a busy machine the kernel chooser keeps whichever of all cores or one ran recent steps faster. With the
    fused decoder (int8 too, which has no split products to switch) one core is its one-thread mode: exploring it
    every other step changes no token."""
    if torch.get_num_threads() < 2:
        pytest.skip("one CPU thread: nothing to choose between")
    model = make_model("tiny-dense")
    prompt = repetitive_prompt(model.config.vocab_size, 60, 3)
    engine = NativeEngine(model, speculative="lookup", prefix_cache_mb=0, quantize="int8")
    try:
        assert engine._choose_threads and engine._split is None and engine.fused_status == "in use"
        want = engine.generate(prompt, SamplingParams(max_new_tokens=16)).tokens
        calls = Recording(engine)
        engine._choosers = {k: KernelChooser(explore_every=2) for k in range(4)}
        assert engine.generate(prompt, SamplingParams(max_new_tokens=16)).tokens == want
        assert True in calls.one_thread and False in calls.one_thread
    finally:
        engine.close()


def test_concurrent_requests_decode_batched_and_exact():
    """Four requests at once: batched decode steps (one token of each row per call) with rows of different lengths."""
    reference = make_model("sliding")
    engine = NativeEngine(make_model("sliding"), speculative=None, prefix_cache_mb=0, max_batch=4)
    calls = Recording(engine)
    prompts = [repetitive_prompt(1024, n, seed=n) for n in (12, 30, 51, 77)]
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = engine.generate(prompts[i], SamplingParams(max_new_tokens=20)).tokens

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, prompt in enumerate(prompts):
            assert results[i] == reference_greedy(reference, prompt, len(results[i])), f"request {i}"
        assert any(b > 1 for b, _ in calls.shapes), "no batched decode step ran fused"
    finally:
        engine.close()


@torch.inference_mode()
def test_bad_calls_raise_clear_errors():
    engine = NativeEngine(make_model("sliding"), speculative=None, prefix_cache_mb=0, max_batch=2, max_seq_len=64)
    try:
        fused = engine._fused._decoder
        one = torch.tensor([[5]])
        cases = [
            (torch.zeros(1, 17, dtype=torch.long), [0], [0], "1 to 16 tokens"),
            (one, [2], [0], "outside the cache's 2 rows"),
            (torch.tensor([[1], [2]]), [0, 0], [0, 0], "given twice"),
            (torch.tensor([[1024]]), [0], [0], "outside [0, 1024)"),
            (one, [0], [-1], "negative start"),
            (one, [0], [64], "exceed the cache"),
            (one.float(), [0], [0], "int64"),
            (one, [0, 1], [0], "one cache row and one start position"),
        ]
        for ids, rows, starts, message in cases:
            with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
                fused.forward(ids, rows, starts, True, False)
    finally:
        engine.close()


def test_where_it_does_not_apply_the_engine_says_why_and_stays_exact():
    model = tiny_model("tiny-moe")
    model.layers[2].mlp.experts.down_proj.data = model.layers[2].mlp.experts.down_proj.data.transpose(1, 2).contiguous(
        ).transpose(1, 2)  # the same values, not contiguous
    strided = NativeEngine(model, speculative=None, prefix_cache_mb=0)
    off = NativeEngine(tiny_model("tiny-dense"), speculative=None, prefix_cache_mb=0, fused_decode=False)
    try:
        assert strided._fused is None and strided.fused_status.startswith("layer 2: experts not contiguous")
        assert off._fused is None and off.fused_status == "off (fused_decode=False)"
        prompt = repetitive_prompt(1024, 40, seed=3)
        got = strided.generate(prompt, SamplingParams(max_new_tokens=12)).tokens
        assert got == reference_greedy(tiny_model("tiny-moe"), prompt, len(got))
    finally:
        strided.close(), off.close()
