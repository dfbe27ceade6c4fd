
import pytest
import torch

from mellum.engine import NativeEngine, SamplingParams
from mellum.engine.sampling import draw, gumbel_noise
from mellum.engine.speculative import DraftLength, NgramDrafter, accept_coupled, accept_greedy
from tests.engine.helpers import StubModel, reference_greedy, repetitive_prompt, stub_config, tiny_model


def one_hot_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 10.0  # [k+1, V]


def test_greedy_acceptance_always_never_sometimes():
    assert accept_greedy([3, 4, 5], one_hot_logits([3, 4, 5, 6], 8)) == (3, 6)  # always: all + bonus token
    assert accept_greedy([3, 4, 5], one_hot_logits([1, 4, 5, 6], 8)) == (0, 1)  # never: the target's own token
    assert accept_greedy([3, 4, 5], one_hot_logits([3, 4, 2, 6], 8)) == (2, 2)  # sometimes: stop at the mismatch


def test_ngram_drafter_proposes_the_latest_continuation():
    d = NgramDrafter([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2], min_ngram=2, max_ngram=3)
    assert d.propose(3) == [3, 7, 8]  # "1 2" last followed by "3 7 8"
    d.extend([3])
    assert d.propose(2) == [7, 8]  # the 3-gram "1 2 3" wins over shorter ones
    assert NgramDrafter([1, 2, 3]).propose(4) == []


def test_draft_length_adapts_to_acceptance():
    length = DraftLength(minimum=1, maximum=8, current=2)
    length.update(2, 2)
    assert length.current == 4
    length.update(4, 4)
    length.update(8, 8)
    assert length.current == 8
    length.update(8, 1)
    assert length.current == 2
    length.update(2, 0)
    assert length.current == 1


@pytest.mark.parametrize("mode", ["lookup", "mtp"])
def test_constrained_tokens_are_never_drafted(mode):
    # Token healing constrains the first tokens (`allowed_next`): speculative engines take those one by one under the
    # constraint, then draft as usual, and give plain decoding's tokens.
    model = tiny_model("tiny-moe")
    spec = NativeEngine(model, speculative=mode, prefix_cache_mb=0, prefill_chunk=64)
    plain = NativeEngine(model, speculative=None, prefix_cache_mb=0, prefill_chunk=64)
    sets = {0: tuple(range(100, 140)), 1: (7, 8, 9), 2: tuple(range(500, 600, 3))}

    def allowed_next(generated):
        return sets.get(len(generated))

    try:
        for seed in range(4):
            prompt = repetitive_prompt(model.config.vocab_size, 40 + 9 * seed, seed)
            params = SamplingParams(max_new_tokens=16, allowed_next=allowed_next)
            result, expected = spec.generate(prompt, params), plain.generate(prompt, params).tokens
            assert [result.tokens[i] in sets[i] for i in range(3)] == [True] * 3
            assert result.tokens == expected, (mode, seed)
    finally:
        spec.close()
        plain.close()


@pytest.mark.parametrize("preset, mode", [("tiny-dense", "lookup"), ("tiny-moe", "lookup"), ("tiny-moe", "mtp")])
def test_speculative_greedy_equals_plain_greedy(preset, mode):
    model = tiny_model(preset)
    spec = NativeEngine(model, speculative=mode, prefix_cache_mb=0, prefill_chunk=64)
    # Plain cached decoding equals the uncached reference (test_kv_cache); checked here once, then used as reference.
    plain = NativeEngine(model, speculative=None, prefix_cache_mb=0, prefill_chunk=64)
    drafted = 0
    try:
        for seed in range(16):
            prompt = repetitive_prompt(model.config.vocab_size, 30 + 7 * seed, seed)
            result = spec.generate(prompt, SamplingParams(max_new_tokens=20))
            expected = plain.generate(prompt, SamplingParams(max_new_tokens=20)).tokens
            if seed == 0:
                assert expected == reference_greedy(model, prompt, 20)
            assert result.tokens == expected, (mode, seed)
            drafted += result.draft_tokens
    finally:
        spec.close()
        plain.close()
    assert drafted > 0  # the drafts were exercised


def _cycle_model(vocab: int, draft_rule):
    """Target: next = (token + 1) % vocab. MTP draft for t+2 given token t+1 = draft_rule(t+1)."""
    config = stub_config(vocab, mtp=True)
    return StubModel(config, lambda t: one_hot_logits([(t + 1) % vocab], vocab)[0],
                     lambda t: one_hot_logits([draft_rule(t) % vocab], vocab)[0])


@pytest.mark.parametrize("rule, expect", [
    (lambda t: t + 1, "always"),
    (lambda t: t + 5, "never"),
    (lambda t: t + 1 if t % 2 == 0 else t + 3, "sometimes"),
])
def test_stub_mtp_always_never_sometimes_accept(rule, expect):
    vocab = 16
    engine = NativeEngine(_cycle_model(vocab, rule), speculative="mtp", prefix_cache_mb=0)
    try:
        result = engine.generate([3], SamplingParams(max_new_tokens=30))
    finally:
        engine.close()
    assert result.tokens == [(3 + i) % vocab for i in range(1, 31)]  # the target's output, whatever the draft
    assert result.draft_tokens > 0
    if expect == "always":
        assert result.accepted_tokens == result.draft_tokens
    elif expect == "never":
        assert result.accepted_tokens == 0
    else:
        assert 0 < result.accepted_tokens < result.draft_tokens


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square test at the 0.1% level (critical values for dof = vocab - 1 = 3)."""
    n = counts.sum()
    stat = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    return stat < 16.27  # chi2.ppf(0.999, 3)


def test_coupled_rule_preserves_the_target_distribution_and_equals_plain_sampling():
    """Drafts drawn from q with each position's Gumbel noise: the emitted token follows p, is the one plain sampling
    draws with the same noise, and the draft agrees with it at least (1 - TV) / (1 + TV) of the time."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    firsts, accepted = torch.zeros(4), 0
    for _ in range(4000):
        noise = gumbel_noise((2, 4), g)
        x = int(draw(q, noise[0]))
        n, token = accept_coupled([x], torch.stack([p, p]), noise)
        first = x if n == 1 else token
        assert first == int(draw(p, noise[0]))  # what a plain (batched, undrafted) step samples
        firsts[first] += 1
        accepted += n
    assert _chi_square_ok(firsts, p)
    tv = 0.4
    assert accepted / 4000 > (1 - tv) / (1 + tv) - 0.03


@pytest.mark.parametrize("mode", ["mtp", "lookup"])
def test_sampled_speculative_decoding_preserves_the_distribution(mode):
    """A stub whose next-token distribution is fixed; every generated token must follow it, drafts or not."""
    vocab = 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    model = StubModel(stub_config(vocab, mtp=True), lambda t: torch.log(p), lambda t: torch.log(q))
    engine = NativeEngine(model, speculative=mode, prefix_cache_mb=0)
    counts = torch.zeros(vocab)
    drafted = 0
    try:
        for seed in range(60):
            prompt = [0, 1, 2, 3] * 4  # repetitive: prompt lookup always finds a draft
            result = engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed))
            counts += torch.bincount(torch.tensor(result.tokens), minlength=vocab)
            drafted += result.draft_tokens
    finally:
        engine.close()
    assert drafted > 500
    assert _chi_square_ok(counts, p), counts / counts.sum()


def test_chained_mtp_drafts_are_accepted_several_at_a_time_and_stay_exact():
    """The MTP layer run again on its own hidden state drafts up to max_mtp_draft tokens per verification."""
    vocab = 16
    counts = {}
    for longest in (1, 3):
        engine = NativeEngine(_cycle_model(vocab, lambda t: t + 1), speculative="mtp", prefix_cache_mb=0,
                              max_mtp_draft=longest)
        try:
            result = engine.generate([3], SamplingParams(max_new_tokens=30))
        finally:
            engine.close()
        assert result.tokens == [(3 + i) % vocab for i in range(1, 31)]
        assert result.accepted_tokens == result.draft_tokens
        counts[longest] = result.accepted_tokens
    # One draft per step accepts about every other token; chains of three accept about three in four.
    assert counts[1] <= 15 < 20 <= counts[3]
