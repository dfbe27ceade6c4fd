import pytest
import torch

from mellum.engine.sampling import SamplingParams, constrain, make_generator, probabilities, sample


def test_greedy_is_argmax_and_allowed_ids_constrain():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    params = SamplingParams(max_new_tokens=1)
    assert sample(logits, params, None).tolist() == [1]
    assert sample(logits, params, None, allowed_ids=(2, 3)).tolist() == [2]


def test_top_k_and_top_p_keep_the_right_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, SamplingParams(max_new_tokens=1, temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # Nucleus 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: two tokens remain.
    p = probabilities(logits, SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probabilities(logits, SamplingParams(max_new_tokens=1, temperature=1.0))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)


def test_seed_reproduces_and_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=7)
    a = sample(logits, params, make_generator(params))
    b = sample(logits, params, make_generator(params))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, temperature=float("nan")), "temperature must be a finite number"),
    (dict(max_new_tokens=4, temperature=float("inf")), "temperature must be a finite number"),
    (dict(max_new_tokens=4, temperature="0.5"), "temperature must be a finite number"),
    (dict(max_new_tokens=4, temperature=1.0, seed=2**64), "seed"),  # manual_seed's range: failed on the engine thread
    (dict(max_new_tokens=4, temperature=1.0, seed=-(2**63) - 1), "seed"),
    (dict(max_new_tokens=4, temperature=1.0, seed=1.5), "seed"),
    (dict(max_new_tokens=4, temperature=1.0, seed=True), "seed"),
    (dict(max_new_tokens=4, stop_ids=[2.7]), "integers"),  # was cast to token 2
    (dict(max_new_tokens=4, stop_ids=["5"]), "integers"),
    (dict(max_new_tokens=4, allowed_first_ids=[1.5]), "integers"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, top_p=1.5), "top_p"),
    (dict(max_new_tokens=4, top_k=-2), "top_k"),
    (dict(max_new_tokens=4, max_lines=0), "max_lines"),
    (dict(max_new_tokens=4, deadline_s=0), "deadline_s"),
    (dict(max_new_tokens=4, allowed_first_ids=()), "allowed_first_ids"),
])
def test_impossible_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="stop_ids"):
        SamplingParams(max_new_tokens=1, stop_ids=[5000]).validate_ids(1024)


def test_seeds_at_the_ends_of_the_range_and_numpy_ids_are_taken():
    np = pytest.importorskip("numpy")
    for seed in (-(2**63), 2**64 - 1, np.int64(3)):
        params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=seed)
        assert type(params.seed) is int and make_generator(params).initial_seed() >= 0
    assert SamplingParams(max_new_tokens=1, stop_ids=np.array([3, 4])).stop_ids == (3, 4)


def test_tiny_temperatures_and_huge_logits_stay_finite():
    """softmax(logits / T) overflowed to inf (NaN probabilities, a failed request) for T below ~1e-37 or logits
    near the float32 limit; the distribution is the argmax's."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    for t in (1e-40, 5e-324):
        params = SamplingParams(max_new_tokens=1, temperature=t, seed=0)
        assert probabilities(logits, params).tolist() == [[0.0, 1.0, 0.0, 0.0]]
        assert sample(logits, params, make_generator(params)).tolist() == [1]
    huge = torch.tensor([[3e38, -3e38, 0.0]])
    assert probabilities(huge, SamplingParams(max_new_tokens=1, temperature=0.5)).tolist() == [[1.0, 0.0, 0.0]]


def test_allowed_ids_outside_the_vocabulary_are_refused():
    """A negative id indexed from the end and silently allowed the last token of the vocabulary."""
    logits = torch.zeros(1, 8)
    assert constrain(logits, (7,)).argmax().item() == 7
    for bad in ((-1,), (3, 8)):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sample(logits, SamplingParams(max_new_tokens=1), None, allowed_ids=bad)
    with pytest.raises(ValueError, match="integers"):
        SamplingParams(max_new_tokens=1, allowed_next=lambda g: (2.5,)).allowed_ids(())


@pytest.mark.parametrize("candidates", [1, 4, 256])
def test_nucleus_from_the_top_candidates_is_the_whole_vocabulary_sort(monkeypatch, candidates):
    """top-p sorts only the most likely tokens when their mass reaches top_p (else the whole vocabulary): the
    distribution must be exactly the one a full sort gives, peaked or flat, batched rows mixing both."""
    import mellum.engine.sampling as sampling

    def reference(logits, params):  # softmax(logits / T), then the nucleus by a sort of every token
        probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / params.temperature, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        sorted_p = sorted_p.masked_fill(torch.cumsum(sorted_p, -1) - sorted_p >= params.top_p, 0.0)
        out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return out / out.sum(-1, keepdim=True)

    monkeypatch.setattr(sampling, "_NUCLEUS_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(0)
    for scale in (0.5, 3.0, 30.0):  # flat (falls back to the full sort), middling, peaked (a handful of tokens)
        logits = torch.randn(3, 500, generator=gen) * scale
        logits[1] *= 40  # one peaked row beside flat ones
        for top_p in (0.5, 0.9, 0.999):
            params = SamplingParams(max_new_tokens=1, temperature=0.7, top_p=top_p)
            assert torch.equal(probabilities(logits, params), reference(logits, params))
