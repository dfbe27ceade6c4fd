import pytest
import torch

from mellum.engine import KVCache, NativeEngine, SamplingParams
from mellum.model import DenseKVCache
from tests.engine.helpers import reference_greedy, tiny_model


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("chunk", [7, 100])  # 100 > ring slack: the concatenating prefill path of sliding layers
def test_cached_decoding_equals_uncached_greedy(preset, chunk):
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(1)
    engine = NativeEngine(model, speculative=None, prefill_chunk=chunk, prefix_cache_mb=0)
    try:
        for length in (5, 40, 150):  # tiny-moe's window is 16: most prompts are longer
            prompt = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()
            result = engine.generate(prompt, SamplingParams(max_new_tokens=24))
            assert result.tokens == reference_greedy(model, prompt, 24)
            assert result.stop_reason == "length" and result.prompt_tokens == length
    finally:
        engine.close()


@torch.no_grad()
def test_ring_cache_matches_the_dense_reference_cache():
    """Same model, same token stream (chunks, then single tokens): ring + full cache vs the model's dense cache."""
    model = tiny_model("tiny-moe")
    config = model.config
    windows = [config.window(i) for i in range(config.num_layers)]
    ring = KVCache(windows, rows=1, max_len=256, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, slack=8)
    assert any(layer.ring and layer.size == 16 + 8 for layer in ring.layers)
    dense = DenseKVCache(config, 1, 256)
    ids = torch.randint(0, config.vocab_size, (1, 120))
    start = 0
    for size in (30, 9, 1, 1, 5, 40, 1, 1):  # 30 and 40 exceed the slack; 5 and 9 use the in-place path
        chunk = ids[:, start:start + size]
        positions = torch.arange(start, start + size)[None]
        a = model(chunk, positions, ring.view([0], start + size)).logits
        b = model(chunk, positions, dense).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        start += size


def test_rows_are_independent_in_a_batched_view():
    model = tiny_model("tiny-moe")
    config = model.config
    windows = [config.window(i) for i in range(config.num_layers)]
    cache = KVCache(windows, rows=3, max_len=64, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        # Rows 0 and 2 (a gathered, non-contiguous view) against each row alone.
        batched = model(ids, torch.arange(20).expand(2, 20), cache.view([0, 2], 20)).logits
        alone = model(ids[1:], torch.arange(20)[None], cache.view([1], 20)).logits
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    # Gathered rows are written back: row 2 holds the KV of sequence 1.
    torch.testing.assert_close(cache.layers[0].k[2, :, :20], cache.layers[0].k[1, :, :20])


def test_fresh_first_chunk_runs_causal_and_matches_masked_prefill():
    """A cold prompt's first chunk attends causally over its own keys (no mask); the result equals chunked prefill."""
    import torch

    from mellum.engine import NativeEngine, SamplingParams
    from tests.engine.helpers import reference_greedy, tiny_model

    prompt = [int(t) for t in torch.randint(5, 200, (90,), generator=torch.Generator().manual_seed(3))]
    params = SamplingParams(max_new_tokens=12)
    outputs = []
    for first in (90, 7):
        engine = NativeEngine(tiny_model("tiny-dense"), prefill_chunk=7, first_chunk=first, prefix_cache_mb=0,
                              speculative=None)
        outputs.append(engine.generate(prompt, params).tokens)
    assert outputs[0] == outputs[1] == reference_greedy(tiny_model("tiny-dense"), prompt, 12)
    view = engine.cache.view([0], 5, fresh=True)
    k = torch.zeros(1, view.cache.layers[0].k.shape[1], 5, view.cache.layers[0].k.shape[-1])
    _, _, mask = view.update(0, k, k, torch.arange(5)[None])
    assert mask is None


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_prefix_causal_attention_equals_masked_attention(heads, kv_heads):
    """The mask-free path for a chunk after a cached prefix (two flash passes merged by log-sum-exp), with grouped
    heads and inputs whose last dimension is not contiguous (as a transposed product leaves them)."""
    import torch.nn.functional as F

    from mellum.model.attention import CachedPrefix, attention_mask, prefix_causal_attention

    torch.manual_seed(0)
    prefix_len, t, d = 37, 9, 16
    q = torch.randn(1, heads, d, t).transpose(-1, -2)  # [1, H, T, D] with last-dim stride T
    k_all = torch.randn(1, kv_heads, prefix_len + t, d)
    v_all = torch.randn(1, kv_heads, prefix_len + t, d)
    positions = torch.arange(prefix_len, prefix_len + t)[None]
    mask = attention_mask(positions, torch.arange(prefix_len + t)[None])
    want = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=heads != kv_heads)
    prefix = CachedPrefix(k_all[:, :, :prefix_len], v_all[:, :, :prefix_len])
    got = prefix_causal_attention(q, k_all[:, :, prefix_len:], v_all[:, :, prefix_len:], prefix)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fp16_cache_stores_rounded_entries_and_returns_activations_dtype():
    """A float16 cache beside fp32 activations: entries are the fp16 rounding of the new keys and values, and every
    path of `update` (fresh chunk, chunk after a cached prefix, single token, ring) hands attention fp32 tensors
    holding exactly those rounded values; the model's logits stay within fp16 rounding of the fp32 cache's."""
    model = tiny_model("tiny-moe")
    config = model.config
    windows = [config.window(i) for i in range(config.num_layers)]
    caches = {dt: KVCache(windows, rows=1, max_len=128, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                          dtype=dt, slack=8) for dt in (torch.float32, torch.float16)}
    assert caches[torch.float16].nbytes < 0.6 * caches[torch.float32].nbytes  # positions stay int64
    ids = torch.randint(0, config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(3))
    start = 0
    for size in (40, 20, 1, 1, 12, 1):  # fresh, prefix + chunk (past the slack), single tokens, a short chunk
        chunk, positions = ids[:, start:start + size], torch.arange(start, start + size)[None]
        views = {dt: c.view([0], start + size, fresh=start == 0) for dt, c in caches.items()}
        full = model(chunk, positions, views[torch.float32]).logits
        half = model(chunk, positions, views[torch.float16]).logits
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, full, atol=2e-3, rtol=2e-3)
        start += size
    k32, k16 = caches[torch.float32].layers[3].k, caches[torch.float16].layers[3].k  # a full-attention layer
    assert k16.dtype == torch.float16
    torch.testing.assert_close(k16[:, :, :start].float(), k32[:, :, :start].half().float(), atol=1e-3, rtol=1e-3)
    # Direct check of one update: the returned keys are the stored fp16 values, widened exactly.
    layer_kv = torch.randn(1, config.num_kv_heads, 1, config.head_dim)
    k_all, v_all, _ = caches[torch.float16].view([0], start + 1).update(3, layer_kv, -layer_kv,
                                                                         torch.tensor([[start]]))
    assert k_all.dtype == torch.float32 and torch.equal(k_all[:, :, start], layer_kv.half().float()[:, :, 0])
    assert torch.equal(v_all[:, :, start], (-layer_kv).half().float()[:, :, 0])


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fp16_cache_engine_prefix_hits_equal_cold_requests(preset):
    """kv_dtype="float16": the prefix cache keeps fp16 blocks, and a request served from them gives the tokens of
    the same request in a fresh engine; fp16 rows take half the KV budget of fp32 ones."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 1024, (120,), generator=g).tolist()
    longer = prompt + torch.randint(0, 1024, (9,), generator=g).tolist()
    warm = NativeEngine(tiny_model(preset), speculative=None, prefix_cache_mb=16, kv_dtype="float16")
    cold = NativeEngine(tiny_model(preset), speculative=None, prefix_cache_mb=0, kv_dtype=torch.float16)
    try:
        warm.generate(prompt, SamplingParams(max_new_tokens=4))
        hit = warm.generate(longer, SamplingParams(max_new_tokens=20))
        assert hit.cached_tokens >= 112
        assert hit.tokens == cold.generate(longer, SamplingParams(max_new_tokens=20)).tokens
        assert warm.prefix_cache.nbytes > 0
    finally:
        warm.close(), cold.close()
    rows = {}
    for kv in (None, "float16"):
        engine = NativeEngine(tiny_model(preset), speculative=None, kv_cache_mb=1.0, max_batch=16, max_seq_len=512,
                              kv_dtype=kv)
        rows[kv] = engine.options.max_batch
        engine.close()
    assert rows["float16"] >= 2 * rows[None] - 1


def test_bad_kv_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown kv_dtype"):
        NativeEngine(tiny_model("tiny-dense"), kv_dtype="int4")
    with pytest.raises(ValueError, match="only the compute dtype, or float16 beside float32 on CPU"):
        NativeEngine(tiny_model("tiny-dense"), kv_dtype=torch.bfloat16)
