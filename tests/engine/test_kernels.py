import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mellum.engine import KVCache, NativeEngine, SamplingParams
from mellum.engine.kernels import (SPLIT_MAX_ROWS, KernelChooser, SplitLinear, fuse_projections, fuse_state_dict,
                                  split_linears)
from mellum.engine.scheduler import Sequence
from tests.engine.helpers import reference_greedy, tiny_model


@pytest.mark.parametrize("splits", [2, 4])
def test_split_linear_equals_f_linear_for_few_and_many_rows(splits):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=False)
    split = SplitLinear(linear, splits)
    assert split.weight is linear.weight  # shared, not copied
    for rows in (1, 3, SPLIT_MAX_ROWS, SPLIT_MAX_ROWS + 1, 40):
        x = torch.randn(2, rows, 48)
        torch.testing.assert_close(split(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


def test_split_linear_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="bias-free"):
        SplitLinear(nn.Linear(8, 8), 2)
    with pytest.raises(ValueError, match="do not divide"):
        SplitLinear(nn.Linear(8, 9, bias=False), 2)


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_fused_and_split_model_computes_the_same_logits(preset):
    model = tiny_model(preset)
    fast = copy.deepcopy(model)
    fuse_projections(fast)
    switch = split_linears(fast, threads=2)
    assert sum(isinstance(m, SplitLinear) and m.switch is switch for m in fast.modules()) >= 2 * fast.config.num_layers
    names = {name.rsplit(".", 1)[-1] for name, _ in fast.named_modules()}
    assert "qkv_proj" in names and "q_proj" not in names
    if preset == "tiny-dense":
        assert "gate_up_proj" in names and "gate_proj" not in names
    assert fast.lm_head.weight is fast.embed_tokens.weight or not model.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(ids[:, :1]).logits, model(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)


def test_engine_load_weights_maps_unfused_state_onto_the_fused_model():
    model, other = tiny_model("tiny-dense", seed=0), tiny_model("tiny-dense", seed=1)
    prompt = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    want = reference_greedy(other, prompt, 10)
    engine = NativeEngine(model, speculative=None, prefix_cache_mb=16)
    try:
        engine.generate(prompt, SamplingParams(max_new_tokens=4))  # fills the prefix cache with the old weights
        engine.load_weights(other.state_dict())
        assert engine.generate(prompt, SamplingParams(max_new_tokens=10)).tokens == want
        with pytest.raises(ValueError, match="unexpected key"):
            engine.load_weights({"nope.weight": torch.zeros(1)})
    finally:
        engine.close()
    state = fuse_state_dict(other.state_dict())
    assert "layers.0.self_attn.qkv_proj.weight" in state and "layers.0.self_attn.q_proj.weight" not in state


def test_a_request_dropped_during_prefill_leaves_its_chunks_in_the_prefix_cache():
    """The user types on while a long prompt is still prefilling: the next keystroke reuses the finished chunks."""
    model = tiny_model("tiny-dense")
    prompt = torch.randint(0, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = NativeEngine(model, speculative=None, prefill_chunk=32, prefix_cache_mb=16, block_tokens=16)
    try:
        # The scheduler's runner calls for a request that is cancelled after two of its seven chunks.
        seq = Sequence(prompt, SamplingParams(max_new_tokens=4), None, None, frozenset(), engine.max_len)
        seq.row = 0
        engine.start(seq)
        engine.prefill_chunk(seq)
        engine.prefill_chunk(seq)
        assert seq.prefilling and seq.filled == 64
        typed = prompt + [7, 8]
        result = engine.generate(typed, SamplingParams(max_new_tokens=6))
        assert result.cached_tokens == 64
        assert result.tokens == reference_greedy(model, typed, 6)
    finally:
        engine.close()


def test_kernel_chooser_keeps_the_faster_setting_and_switches_when_the_other_wins():
    chooser = KernelChooser(explore_every=8, margin=0.8, initial=True)
    timings = {True: 1.0, False: 3.0}  # split products fast (an idle machine)
    used = []
    for _ in range(24):
        setting = chooser.choose()
        used.append(setting)
        chooser.record(timings[setting])
    # Tried at steps 2 and 4, then every 8th; never adopted.
    assert chooser.current is True and [i + 1 for i, u in enumerate(used) if not u] == [2, 4, 8, 16, 24]
    timings = {True: 5.0, False: 1.0}  # another process keeps a core busy: the split collapses
    for _ in range(8):
        chooser.record(timings[chooser.choose()])
    assert chooser.current is False and chooser.switches == 1
    assert [chooser.choose() for _ in range(3)] == [False, False, False]
    busy = KernelChooser(explore_every=64)  # a busy machine from the start: the switch comes at step 2
    for _ in range(3):
        busy.record({True: 5.0, False: 1.0}[busy.choose()])
    assert busy.current is False


def test_engine_tokens_are_the_same_with_split_products_on_or_off():
    model = tiny_model("tiny-dense")
    prompt = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    want = reference_greedy(model, prompt, 12)
    engine = NativeEngine(copy.deepcopy(model), speculative="lookup", prefix_cache_mb=0)
    try:
        if engine._split is None:
            pytest.skip("one CPU thread: the engine does not split products")
        for explore_every in (1_000_000, 2):  # always split; alternate every other step
            engine._choosers = {k: KernelChooser(explore_every=explore_every) for k in range(4)}
            assert engine.generate(prompt, SamplingParams(max_new_tokens=12)).tokens == want
    finally:
        engine.close()


def test_a_model_prepared_by_the_engine_refuses_to_save_in_the_checkpoint_layout(tmp_path):
    from mellum import save_pretrained

    model = tiny_model("tiny-dense")
    NativeEngine(model, speculative=None).close()  # the engine fused the model's projections in place
    with pytest.raises(ValueError, match="prepared for inference"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_kv_cache_budget_limits_concurrent_rows_and_rejects_a_budget_below_one_sequence(capsys):
    model = tiny_model("tiny-dense")
    cfg = model.config
    row_mb = 256 * cfg.num_layers * (2 * cfg.num_kv_heads * cfg.head_dim * 4 + 8) / 2**20  # 256-token rows, fp32
    engine = NativeEngine(model, speculative=None, max_batch=4, max_seq_len=256, kv_cache_mb=2.5 * row_mb)
    try:
        assert engine.options.max_batch == 2 and engine.cache.rows == 2
        assert "2 concurrent sequence(s) instead of 4" in capsys.readouterr().err
        prompt = list(range(1, 40))
        assert engine.generate(prompt, SamplingParams(max_new_tokens=5)).tokens == reference_greedy(model, prompt, 5)
    finally:
        engine.close()
    # The budget's row size is what the cache allocates per row.
    assert engine.cache.nbytes == 2 * KVCache.row_nbytes(engine.windows, 256, cfg.num_kv_heads, cfg.head_dim,
                                                         torch.float32, engine.cache.slack)
    with pytest.raises(ValueError, match="lower max_seq_len or raise kv_cache_mb"):
        NativeEngine(model, max_seq_len=256, kv_cache_mb=0.5 * row_mb)
