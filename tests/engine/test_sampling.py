import pytest
import torch

from mellum.engine.sampling import SamplingParams, make_generator, probabilities, sample


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
    (dict(max_new_tokens=4, temperature=float("nan")), "temperature"),
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
