import dataclasses

import pytest
import torch

from mellum.config import get_config
from mellum.engine import NativeEngine, SamplingParams
from mellum.model import Transformer
from tests.engine.helpers import tiny_model


def test_prefix_hits_give_the_same_tokens_as_cold_requests():
    for preset in ("tiny-dense", "tiny-moe"):
        model = tiny_model(preset)
        g = torch.Generator().manual_seed(3)
        base = torch.randint(0, model.config.vocab_size, (90,), generator=g).tolist()
        # A keystroke sequence: the prompt grows by a few tokens and its last token changes each time.
        prompts = [base[:60 + 3 * i] + [i + 1] for i in range(6)]
        warm = NativeEngine(model, speculative=None, prefill_chunk=32, prefix_cache_mb=16)
        cold = NativeEngine(model, speculative=None, prefill_chunk=32, prefix_cache_mb=0)
        params = SamplingParams(max_new_tokens=12)
        try:
            cached = []
            for prompt in prompts:
                a, b = warm.generate(prompt, params), cold.generate(prompt, params)
                assert a.tokens == b.tokens, preset
                assert b.cached_tokens == 0
                cached.append(a.cached_tokens)
            assert cached[0] == 0 and min(cached[1:]) >= 48, (preset, cached)  # block-aligned reuse of the prefix
            assert warm.prefix_cache.hits >= 5
        finally:
            warm.close()
            cold.close()


def test_sliding_layers_keep_only_recent_blocks():
    model = tiny_model("tiny-moe")  # window 16, blocks of 16 tokens
    engine = NativeEngine(model, speculative=None, prefix_cache_mb=16, block_tokens=16, ring_slack=32)
    try:
        engine.generate(list(range(1, 300)), SamplingParams(max_new_tokens=2))
        blocks = sorted(engine.prefix_cache._walk(), key=lambda b: b.depth)
        assert len(blocks) == 298 // 16
        with_sliding = [b.depth for b in blocks if b.sliding_kv is not None]
        # Only blocks inside the final ring (window 16 + slack 32 = 48 tokens) keep sliding-layer KV.
        assert 1 <= len(with_sliding) <= 3 and with_sliding[-1] == blocks[-1].depth
        # A prompt that diverges early can reuse nothing (its matched blocks lack sliding KV): still correct.
        other = list(range(1, 100)) + [7, 7, 7]
        a = engine.generate(other, SamplingParams(max_new_tokens=6))
        assert a.cached_tokens == 0
    finally:
        engine.close()


def test_the_prefix_cache_respects_its_byte_budget_and_evicts_lru():
    model = tiny_model("tiny-dense")
    budget_mb = 0.05
    engine = NativeEngine(model, speculative=None, prefix_cache_mb=budget_mb, block_tokens=8)
    g = torch.Generator().manual_seed(5)
    try:
        prompts = [torch.randint(0, 1024, (120,), generator=g).tolist() for _ in range(8)]
        for prompt in prompts:
            engine.generate(prompt, SamplingParams(max_new_tokens=2))
            pc = engine.prefix_cache
            assert pc.nbytes <= budget_mb * 2**20
            assert pc.nbytes == sum(b.nbytes for b in pc._walk())  # accounting matches the tensors held
        # The newest prompt survived eviction; the oldest did not.
        assert engine.generate(prompts[-1], SamplingParams(max_new_tokens=2)).cached_tokens > 0
        assert engine.generate(prompts[0] + [1], SamplingParams(max_new_tokens=2)).cached_tokens == 0
    finally:
        engine.close()


def test_a_request_reuses_the_kv_its_row_kept_from_the_previous_one():
    """Keystrokes in one row: the shared prefix (not only whole blocks) is reused in place, generated tokens
    included when the user accepted them; outputs equal a cold engine's, with sliding rings and speculation."""
    for preset in ("tiny-dense", "tiny-moe"):
        model = tiny_model(preset)
        g = torch.Generator().manual_seed(5)
        base = torch.randint(0, model.config.vocab_size, (120,), generator=g).tolist()
        warm = NativeEngine(model, speculative="lookup", prefill_chunk=32, prefix_cache_mb=16, max_batch=1)
        cold = NativeEngine(model, speculative=None, prefill_chunk=32, prefix_cache_mb=0, max_batch=1)
        params = SamplingParams(max_new_tokens=8)
        try:
            first = warm.generate(base[:70], params)
            assert first.tokens == cold.generate(base[:70], params).tokens
            # Typed two characters: everything before the edited last token is still in the row.
            typed = base[:69] + [3, 4]
            a = warm.generate(typed, params)
            assert a.tokens == cold.generate(typed, params).tokens, preset
            assert a.cached_tokens == 69  # not rounded down to the 16-token blocks of the prefix cache
            # Accepted the completion and typed on: its generated tokens' KV is reused as well.
            accepted = typed + a.tokens + [5]
            b = warm.generate(accepted, params)
            assert b.tokens == cold.generate(accepted, params).tokens, preset
            assert b.cached_tokens >= len(typed) + len(a.tokens) - 1
            # An edit far back (beyond the ring slack of the sliding layers): still exact.
            edited = base[:10] + [6] + base[11:100]
            c = warm.generate(edited, params)
            assert c.tokens == cold.generate(edited, params).tokens, preset
            assert c.cached_tokens <= 10
        finally:
            warm.close()
            cold.close()


def test_row_reuse_stays_exact_under_concurrency_cancellation_and_speculation():
    """Two editors typing into the same engine (two rows), some requests cancelled mid-way: every finished
    request equals a cold engine's greedy output, whichever row and whatever KV it inherited."""
    import random
    import threading

    for preset in ("tiny-dense", "tiny-moe"):
        model = tiny_model(preset)
        rng = random.Random(7)
        vocab = model.config.vocab_size
        files = [[rng.randrange(vocab) for _ in range(150)] for _ in range(2)]
        warm = NativeEngine(model, speculative="lookup", prefill_chunk=32, prefix_cache_mb=1, max_batch=2)
        cold = NativeEngine(model, speculative=None, prefix_cache_mb=0, max_batch=1)
        params = SamplingParams(max_new_tokens=10)
        results: list[tuple[list[int], object]] = []
        lock = threading.Lock()

        def editor(i: int) -> None:
            local = random.Random(i)
            text = list(files[i][:60])
            for step in range(8):
                text = text[:-local.randint(0, 3)] + [local.randrange(vocab) for _ in range(local.randint(1, 4))]
                cancel = threading.Event()
                hook = (lambda _t, c=cancel: c.set()) if step % 3 == 2 else None  # typed on after the first token
                r = warm.generate(list(text), params, cancel=cancel, on_token=hook)
                with lock:
                    results.append((list(text), r))

        try:
            threads = [threading.Thread(target=editor, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            finished = [(p, r) for p, r in results if r.stop_reason != "cancelled"]
            assert len(results) == 16 and len(finished) >= 8
            for prompt, r in finished:
                assert r.tokens == cold.generate(prompt, params).tokens, preset
            assert sum(r.cached_tokens for _, r in finished) > 0
            assert warm.busy_slots == 0
        finally:
            warm.close()
            cold.close()


@pytest.mark.parametrize("mtp_layer_type, block_tokens", [("full_attention", 16), ("sliding_attention", 16),
                                                           ("sliding_attention", 4)])
def test_mtp_kv_after_a_prefix_hit_equals_an_uncached_prefill(mtp_layer_type, block_tokens):
    """The MTP layer's entry at position t reads token t + 1, which a block's key does not fix. Three prompts share
    two blocks; the second diverges right after them, the third follows the second one block further and then
    diverges. Each one's MTP cache entries and first MTP draft logits must equal those of a cold engine: the entry
    at the last matched position was the first prompt's (computed with its next token), and with a full-attention
    MTP layer so was the third prompt's at the end of the second block (stored by the first prompt, followed in
    the tree by the second prompt's block)."""
    config = dataclasses.replace(get_config("tiny-moe"), mtp_layer_type=mtp_layer_type)  # window 16
    torch.manual_seed(0)
    model = Transformer(config).eval()
    g = torch.Generator().manual_seed(1)
    bt, mtp = block_tokens, config.num_layers

    def rand(n: int) -> list[int]:
        return torch.randint(0, config.vocab_size, (n,), generator=g).tolist()

    first = rand(3 * bt + 12)
    second = first[:2 * bt] + [(first[2 * bt] + 1) % config.vocab_size] + rand(bt + 11)
    third = second[:3 * bt] + [(second[3 * bt] + 1) % config.vocab_size] + rand(7)
    warm = NativeEngine(model, speculative="mtp", prefix_cache_mb=16, block_tokens=bt, max_batch=1)
    cold = NativeEngine(model, speculative="mtp", prefix_cache_mb=0, block_tokens=bt, max_batch=1)

    def run(engine, prompt):
        seq = engine.submit(prompt, SamplingParams(max_new_tokens=1))  # prefill only: the row holds the prompt
        result = engine.wait(seq)
        held = engine.cache.held_from(mtp, seq.row, len(prompt))
        return result, held, engine.cache.read(mtp, seq.row, held, len(prompt)), seq.state["mtp_logits"]

    try:
        for prompt, matched in ((first, 0), (second, 2 * bt), (third, 3 * bt)):
            hit, held, kv, logits = run(warm, prompt)
            ref, ref_held, ref_kv, ref_logits = run(cold, prompt)
            assert hit.tokens == ref.tokens and ref_held == 0
            # The row holds the MTP layer's whole window from the cache (its prefix in full), ends of blocks included.
            assert held <= (0 if mtp_layer_type == "full_attention" else max(0, matched - config.sliding_window))
            torch.testing.assert_close(kv, ref_kv[:, :, held:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
            assert hit.cached_tokens == max(0, matched - 1)  # the last matched position is prefilled again
        cache = warm.prefix_cache
        assert cache.nbytes == sum(b.nbytes for b in cache._walk())
        # Every block past the first that can be loaded for the MTP layer carries the MTP entry before it.
        kept = [b for b in cache._walk() if b.depth > 1 and (b.full_kv if mtp in cache.full_layers else b.sliding_kv)
                is not None]
        assert kept and all(b.mtp_head is not None for b in kept)
    finally:
        warm.close()
        cold.close()
