"""Engine features crossed: prefix cache and kept row prefixes over sliding-window layers, speculative decoding (prompt
lookup, MTP) with stops inside accepted drafts, continuous batching with requests joining and cancelling, token
healing, seeded sampling, the fused decoder. Every fast path must give the tokens of uncached forwards (greedy, or
sampled with the request's per-position noise), whatever ran beside it, and leave no slot or cache byte behind."""

import random
import threading

import pytest
import torch

from mellum.engine import NativeEngine, SamplingParams
from mellum.engine.sampling import PositionNoise, make_generator, sample
from tests.engine.helpers import StubModel, reference_greedy, repetitive_prompt, stub_config, tiny_model


@torch.inference_mode()
def reference(model, prompt: list[int], params: SamplingParams, newline_ids=frozenset(), max_len: int = 10**9):
    """(tokens, stop_reason) from full forwards without any cache: argmax, or the draw with the request's Gumbel
    noise of each position; stop ids, lines, length and context as the engine applies them."""
    generator = make_generator(params)
    noise = PositionNoise(generator, model.config.vocab_size, "cpu") if generator is not None else None
    ids, out, lines, constrained = list(prompt), [], 0, True
    while True:
        logits = model(torch.tensor([ids])).logits[0, -1:].float()  # [1, V]
        allowed = params.allowed_ids(tuple(out)) if constrained else None
        constrained = allowed is not None
        token = int(sample(logits, params, None, allowed, noise.take(len(out)) if noise else None)[0])
        if token in params.stop_ids:
            return out, "stop"
        out.append(token)
        ids.append(token)
        lines += token in newline_ids
        if params.max_lines is not None and lines >= params.max_lines:
            return out, "lines"
        if len(out) >= params.max_new_tokens:
            return out, "length"
        if len(ids) >= max_len:
            return out, "context"


@pytest.mark.parametrize("fused", [False, True])
def test_sliding_layers_stored_whole_still_mask_their_window(fused):
    """max_seq_len <= window + slack: the sliding layers keep every position (no ring), yet attend only over their
    window. The one-row mask-free path took them for full-attention layers and attended over the whole prompt."""
    engine = NativeEngine(tiny_model("tiny-moe"), speculative=None, prefix_cache_mb=0, max_seq_len=64,
                          fused_decode=fused)
    try:
        assert any(layer.window and not layer.ring for layer in engine.cache.layers)
        for seed in range(3):
            prompt = repetitive_prompt(1024, 40, seed)
            assert engine.generate(prompt, SamplingParams(max_new_tokens=10)).tokens == \
                reference_greedy(engine.model, prompt, 10), seed
    finally:
        engine.close()


def test_prefix_cache_and_kept_rows_hold_the_sliding_window_they_use():
    """A row filled from the prefix cache holds sliding-layer KV only for the window before its reuse point. Keeping
    more of that row for the next request (the kept-prefix check assumed a full ring), or copying blocks out of it
    into the prefix cache (stale ring slots stored as KV), gave later requests keys of other positions."""
    g = torch.Generator().manual_seed(0)
    text, other = torch.randint(0, 1024, (400,), generator=g).tolist(), torch.randint(0, 1024, (30,), generator=g).tolist()
    engine = NativeEngine(tiny_model("tiny-moe"), speculative=None, max_batch=1)
    params = SamplingParams(max_new_tokens=8)
    try:
        # The row of the third request is loaded from the prefix cache (192 tokens, sliding KV of [176, 192));
        # the fourth shares 177 tokens with it, so it needs sliding KV of [162, 177) and must not keep the row.
        for prompt in (text[:200], other, text[:200] + other[:10], text[:177] + other[20:25]):
            assert engine.generate(prompt, params).tokens == reference_greedy(engine.model, prompt, 8)
        engine.prefix_cache.clear()
        # The third request loads 560 tokens (sliding KV of [544, 560)) and prefills 5 more: blocks it did not
        # hold, down to 485, must not get sliding KV from its ring. The fifth request matches one of them.
        for prompt in (text[:400] + other[:30] + text[:178], other, text[:560] + other[:5], other[5:],
                       text[:530] + other[10:14]):
            prompt = prompt[:engine.max_len - 10]
            assert engine.generate(prompt, params).tokens == reference_greedy(engine.model, prompt, 8), len(prompt)
    finally:
        engine.close()


def test_a_stop_inside_accepted_drafts_leaves_a_row_the_next_request_can_keep():
    """Prompt lookup accepts several drafts at once; a stop id among them ends the request with KV for tokens that
    are not in its output. The next request, extending the prompt with that output, read past its tokens
    (IndexError: every later request in the row failed) instead of keeping the shared prefix."""
    vocab = 16
    model = StubModel(stub_config(vocab, mtp=False),
                      lambda t: torch.nn.functional.one_hot(torch.tensor((t + 1) % vocab), vocab).float() * 10)
    engine = NativeEngine(model, speculative="lookup", newline_ids=[9], max_batch=1)
    prompt = list(range(vocab)) * 3 + [0, 1, 2]  # lookup drafts 3, 4, 5, ... and the target accepts them
    try:
        for params in (SamplingParams(max_new_tokens=20, stop_ids=[7]), SamplingParams(max_new_tokens=20, max_lines=1)):
            first = engine.generate(prompt, params)
            assert first.accepted_tokens >= 2 and first.tokens == list(range(3, 7 if params.stop_ids else 10))
            follow = prompt + first.tokens + [12, 13]
            second = engine.generate(follow, SamplingParams(max_new_tokens=3))
            # The row is kept up to the last token with KV (after a stop id: all of the output).
            assert second.tokens == [14, 15, 0] and second.cached_tokens >= len(prompt) + len(first.tokens) - 1
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["lookup", "mtp"])
def test_a_seed_samples_the_same_tokens_alone_batched_or_uncached(mode):
    """Alone, a request speculates; batched, it takes plain steps. Its sampled tokens used to depend on which (the
    rejection rule draws differently from plain sampling), so a seeded evaluation run with parallel workers was not
    reproducible. Now both equal uncached sampling with the request's noise."""
    if mode == "lookup":  # a fixed next-token distribution over a repetitive prompt: lookup always drafts
        vocab = 8
        p = torch.softmax(torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]), dim=0)
        model = StubModel(stub_config(vocab, mtp=False), lambda t: torch.log(p.roll(t)))
        prompt, other = [0, 1, 2, 3] * 6, [5, 6, 7] * 3
    else:
        model, vocab = tiny_model("tiny-moe"), 1024
        prompt, other = repetitive_prompt(vocab, 60, 3), repetitive_prompt(vocab, 30, 4)
    engine = NativeEngine(model, speculative=mode, max_batch=2, prefix_cache_mb=0)
    try:
        for seed in range(3):
            params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed)
            alone = engine.generate(prompt, params)
            neighbour = engine.submit(other, SamplingParams(max_new_tokens=60))
            batched = engine.wait(engine.submit(prompt, params))
            engine.wait(neighbour)
            assert alone.draft_tokens > 0 and batched.draft_tokens < alone.draft_tokens
            assert alone.tokens == batched.tokens == reference(engine.model, prompt, params)[0], seed
    finally:
        engine.close()


def _options(rng: random.Random, preset: str) -> dict:
    return dict(
        speculative=rng.choice([None, "lookup"] + (["mtp"] if preset == "tiny-moe" else [])),
        fused_decode=rng.random() < 0.6, prefix_cache_mb=rng.choice([0, 256, 0.02]),
        prefill_chunk=rng.choice([5, 16, 23, 64, None]), first_chunk=rng.choice([None, 7, 40]),
        block_tokens=rng.choice([4, 16]), ring_slack=rng.choice([0, 8, 64]), max_batch=rng.choice([1, 2, 3, 4]),
        max_seq_len=rng.choice([80, 128, 200]), max_draft=rng.choice([1, 3, 8]), max_mtp_draft=rng.choice([1, 2, 3]))


def _params(rng: random.Random, vocab: int) -> SamplingParams:
    kw: dict = dict(max_new_tokens=rng.choice([1, 4, 12, 30]))
    if rng.random() < 0.3:
        kw.update(temperature=rng.choice([0.3, 1.0]), seed=rng.randint(0, 5), top_p=rng.choice([1.0, 0.9]))
    if rng.random() < 0.3:
        kw["stop_ids"] = rng.sample(range(vocab), 30)
    if rng.random() < 0.3:
        kw["max_lines"] = rng.choice([1, 2])
    if rng.random() < 0.15:
        kw["allowed_first_ids"] = rng.sample(range(vocab), rng.choice([1, 3]))
    elif rng.random() < 0.2:  # token healing over a few tokens
        sets = [rng.sample(range(vocab), rng.choice([1, 2, 4])) for _ in range(rng.choice([1, 2, 3]))]
        kw["allowed_next"] = lambda done, sets=sets: sets[len(done)] if len(done) < len(sets) else None
    return SamplingParams(**kw)


def _cancel_after(n: int, cancel: threading.Event):
    """An on_token callback that cancels its request once it has streamed n tokens (the user typed on)."""
    seen = []

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) >= n:
            cancel.set()
    return on_token


# Seeds of the crossing below that failed before the fixes above (0, 13, 36, 47: greedy tokens off after a kept row or
# a prefix-cache load over sliding layers; 9: a seeded MTP request sampled differently alone and batched). A search
# of 400 seeds ran clean after them, except on exact logit ties of the random models, where the fused and the
# layer-by-layer forwards may pick either token.
@pytest.mark.parametrize("seed", [0, 9, 13, 36, 47])
def test_random_crossings_of_the_engine_options_equal_uncached_decoding(seed):
    """Waves of concurrent requests (fresh prompts, keystrokes that accept part of an output, edits) with random
    options, some cancelled before or while they run or given deadlines: finished ones equal the uncached reference,
    stopped ones a prefix of it; afterwards no row is busy and the prefix cache is within its budget."""
    rng = random.Random(seed)
    preset = rng.choice(["tiny-dense", "tiny-moe"])
    options = _options(rng, preset)
    vocab = 1024
    newline_ids = frozenset(rng.sample(range(vocab), 40))
    engine = NativeEngine(tiny_model(preset, seed % 3), newline_ids=newline_ids, **options)
    text, history = repetitive_prompt(vocab, 400, seed), []
    try:
        for _ in range(rng.choice([3, 5])):
            wave = []
            for _ in range(rng.choice([1, 2, 3, 5])):
                kind = rng.random()
                if kind < 0.4 or not history:
                    prompt = text[:rng.randint(3, engine.max_len - 2)]
                elif kind < 0.7:  # the user accepted part of an output and typed on
                    prompt, out = rng.choice(history)
                    prompt = prompt + out[:rng.randint(0, len(out))] + rng.sample(range(vocab), rng.randint(0, 3))
                else:  # the user deleted and typed
                    prompt, _ = rng.choice(history)
                    prompt = prompt[:max(1, len(prompt) - rng.randint(1, 20))] + rng.sample(range(vocab), 2)
                prompt = prompt[:engine.max_len - 1]
                params, mode = _params(rng, vocab), rng.choice(["plain"] * 6 + ["cancel", "cancelled", "deadline"])
                if mode == "deadline":
                    params = SamplingParams(**{**params.__dict__, "deadline_s": 0.01})
                cancel, after = threading.Event(), rng.randint(1, 5)
                if mode == "cancelled":
                    cancel.set()
                on_token = _cancel_after(after, cancel) if mode == "cancel" else None
                wave.append((prompt, params, engine.submit(prompt, params, cancel=cancel, on_token=on_token)))
            for prompt, params, handle in wave:
                result = engine.wait(handle)
                history.append((prompt, result.tokens))
                tokens, reason = reference(engine.model, prompt, params, newline_ids, engine.max_len)
                if result.stop_reason in ("cancelled", "deadline"):
                    assert result.tokens == tokens[:len(result.tokens)], (options, len(prompt), params)
                else:
                    assert (result.tokens, result.stop_reason) == (tokens, reason), (options, len(prompt), params)
        scheduler, cache = engine.scheduler, engine.prefix_cache
        assert engine.busy_slots == 0 and not scheduler.waiting
        assert sorted(scheduler.free_rows) == list(range(engine.options.max_batch))
        assert cache.nbytes == sum(block.nbytes for block in cache._walk()) <= cache.budget_bytes
    finally:
        engine.close()
