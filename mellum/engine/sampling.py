"""Token sampling: the request's decoding parameters and the logits → next-token rule (greedy or sampled)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes; any other seed fails on the engine thread


def token_ids(values, what: str) -> list[int]:
    """`values` (a sequence, integer tensor or array) as Python ints; ValueError naming `what` for anything that is
    not an integer (a float, string or bool would otherwise be truncated or cast into a different token)."""
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    ids = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{what} token ids must be integers, got {value!r} ({type(value).__name__})")
        ids.append(int(value))
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters.

    `stop_ids`: generation ends when one of these ids is produced (it is not part of the output).
    `max_lines`: end after the token that completes this many lines (needs the engine's `newline_ids`).
    `deadline_s`: wall-clock budget from submission, in seconds. `allowed_first_ids`: the first generated token
    must be one of these (token healing: the completion must start by re-typing the text backed off the prompt).
    `allowed_next`: the general form, for constraints that last more than one token: called with the tokens
    generated so far (a tuple, empty for the first), it returns the ids the next token must be one of, or None once
    the output is free; after its first None it is not called again. It replaces `allowed_first_ids` when given.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    max_lines: int | None = None
    deadline_s: float | None = None
    allowed_first_ids: tuple[int, ...] | None = None
    allowed_next: Callable[[tuple[int, ...]], tuple[int, ...] | None] | None = None

    def __post_init__(self):
        # Accept lists/sets from callers; store tuples so params stay hashable and immutable.
        object.__setattr__(self, "stop_ids", tuple(token_ids(self.stop_ids, "stop_ids")))
        if self.allowed_first_ids is not None:
            object.__setattr__(self, "allowed_first_ids", tuple(token_ids(self.allowed_first_ids, "allowed_first_ids")))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        t = self.temperature
        if not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
        if self.max_lines is not None and (not isinstance(self.max_lines, int) or self.max_lines < 1):
            raise ValueError(f"max_lines must be a positive integer or None, got {self.max_lines!r}")
        if self.deadline_s is not None and not (self.deadline_s > 0):
            raise ValueError(f"deadline_s must be > 0 seconds or None, got {self.deadline_s!r}")
        if self.allowed_first_ids is not None and len(self.allowed_first_ids) == 0:
            raise ValueError("allowed_first_ids is empty: no first token could be generated")
        if self.allowed_next is not None and not callable(self.allowed_next):
            raise ValueError(f"allowed_next must be a function of the generated tokens, got {self.allowed_next!r}")

    def allowed_ids(self, generated: tuple[int, ...]) -> tuple[int, ...] | None:
        """The ids the token after `generated` must be one of, or None (unconstrained)."""
        if self.allowed_next is not None:
            allowed = self.allowed_next(generated)
            if allowed is not None and len(allowed) == 0:
                raise ValueError(f"allowed_next returned no ids after {len(generated)} tokens: nothing could follow")
            return None if allowed is None else tuple(token_ids(allowed, "allowed_next's"))
        return self.allowed_first_ids if not generated else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate_ids(self, vocab_size: int) -> None:
        """Raise ValueError if a stop or allowed id lies outside the vocabulary."""
        for name, ids in (("stop_ids", self.stop_ids), ("allowed_first_ids", self.allowed_first_ids or ())):
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{name} contains ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG for the request (reproducible with `seed`), or None for greedy decoding."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def constrain(logits: torch.Tensor, allowed_ids: tuple[int, ...] | None) -> torch.Tensor:
    """Logits [..., V] with every id outside `allowed_ids` set to -inf (no-op when None)."""
    if allowed_ids is None:
        return logits
    vocab = logits.shape[-1]
    if min(allowed_ids) < 0 or max(allowed_ids) >= vocab:  # a negative id would index from the end, silently
        raise ValueError(f"allowed ids outside the vocabulary [0, {vocab}): "
                         f"{[i for i in allowed_ids if not 0 <= i < vocab][:5]}")
    keep = torch.full_like(logits, float("-inf"))
    idx = torch.tensor(allowed_ids, device=logits.device)
    keep[..., idx] = 0.0
    return logits + keep


_NUCLEUS_CANDIDATES = 256  # tokens sorted for top-p before falling back to the whole vocabulary


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: softmax(logits / T) restricted to the top-k and the top-p nucleus. [..., V]."""
    # Shifted by the row's maximum first (the softmax is unchanged): a tiny temperature or huge logits would
    # otherwise overflow to inf and leave NaN probabilities; a temperature below float32's range would read as 0.
    logits = logits.float()
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens whose mass reaches top_p. It nearly
        # always lies within the few hundred most likely tokens: sorting those alone gives the same set (every token
        # past them has at least their mass before it), at a tenth of the cost of sorting the vocabulary per step.
        sorted_p, order = torch.topk(probs, min(vocab, _NUCLEUS_CANDIDATES), dim=-1)  # sorted, most likely first
        if sorted_p.shape[-1] < vocab and not bool((sorted_p.sum(dim=-1) >= params.top_p).all()):
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise of `shape`: argmax(log p + noise) is a draw from p (the Gumbel-max trick)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u))  # u = 0 gives -inf: never the argmax


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The token ids [...] that Gumbel noise [..., V] picks from distributions probs [..., V] (zero mass never)."""
    return torch.argmax(torch.log(probs) + noise, dim=-1)


class PositionNoise:
    """A request's sampling randomness, one Gumbel vector [V] per generated position, drawn from its seeded RNG in
    position order whoever asks first: a batched decode step, a speculative draft or its verification. A sampled
    token is then a function of its distribution and its position alone, so a seed gives the same tokens whether the
    request ran alone (speculating) or batched with others (plain steps), as reruns of a seeded evaluation expect."""

    def __init__(self, generator: torch.Generator, vocab: int, device: torch.device | str):
        self.generator, self.vocab, self.device = generator, vocab, device
        self._noise: dict[int, torch.Tensor] = {}
        self._next = 0

    def take(self, start: int, n: int = 1) -> torch.Tensor:
        """Noise [n, V] of positions [start, start + n); positions before `start` are done with and dropped."""
        for i in [i for i in self._noise if i < start]:
            del self._noise[i]
        while self._next < start + n:
            if self._next >= start:
                self._noise[self._next] = gumbel_noise((self.vocab,), self.generator, self.device)
            else:  # a position nobody sampled (cannot happen in the engine): keep the stream in step all the same
                gumbel_noise((self.vocab,), self.generator, self.device)
            self._next += 1
        if n == 0:
            return torch.empty(0, self.vocab, device=self.device)
        return torch.stack([self._noise[i] for i in range(start, start + n)])


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           allowed_ids: tuple[int, ...] | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when greedy, else a draw from `probabilities` with `noise`
    [B, V] (`PositionNoise`), or noise from `generator` when none is given."""
    logits = constrain(logits, allowed_ids)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = probabilities(logits, params)
    if noise is None:
        noise = gumbel_noise(tuple(probs.shape), generator, probs.device)
    return draw(probs, noise)
