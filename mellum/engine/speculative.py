"""Speculative decoding rules: prompt-lookup (n-gram) drafts, the acceptance rules for greedy and sampled
decoding, and the adaptive draft length. The engine supplies the drafts from MTP or lookup and the target logits.

Greedy verification accepts a draft token exactly when it equals the target's argmax, so the output is identical
to plain greedy decoding. Sampled verification does the same with the request's Gumbel noise of each position
(`mellum.engine.sampling.PositionNoise`): the target's token there is argmax(log p + g), a draft token is accepted
when it equals it, so the output is token for token what plain sampling with the same seed gives, batched or not.
A deterministic draft x (prompt lookup) is accepted with probability p(x), as under the rejection rule of Leviathan
et al. 2023 (Alg. 1) with q = one-hot(x). An MTP draft is drawn with the same noise from its own distribution q
(argmax(log q + g)): the Gumbel coupling of p and q, which agrees at least (1 - TV) / (1 + TV) of the time against
1 - TV for the rejection rule (Daliri et al. 2024, "Coupling without Communication and Drafter-Invariant Speculative
Decoding"), whose tokens depend on the path taken (its rejection draws), and so on the batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mellum.engine.sampling import draw


class NgramDrafter:
    """Prompt-lookup drafting (Saxena 2023, "Prompt Lookup Decoding"): find the latest earlier occurrence of the
    sequence's last n tokens (longest n first) and propose the tokens that followed it.

    Keeps a dict n-gram → index of the token that followed its latest occurrence, updated in O(max_n) per token.
    """

    def __init__(self, tokens: list[int], min_ngram: int = 2, max_ngram: int = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            i = len(self.tokens)  # the index this token takes; register the n-grams that end just before it
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i >= n:
                    self.index[tuple(self.tokens[i - n:i])] = i
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k draft tokens continuing the current sequence, or [] when no n-gram recurs."""
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(self.tokens) < n:
                continue
            start = self.index.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []


@dataclass
class DraftLength:
    """Adaptive draft length: double after a fully accepted draft, shrink to the accepted run + 1 otherwise."""

    minimum: int = 1
    maximum: int = 8
    current: int = 4

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.current = min(self.maximum, self.current * 2)
        else:
            self.current = max(self.minimum, min(self.maximum, accepted + 1))


def accept_greedy(draft: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """Verify a draft against target logits [k+1, V] (row i predicts the token after draft[:i]).

    Returns (number of draft tokens accepted, the next token after them): identical to greedy decoding.
    """
    target = torch.argmax(logits, dim=-1).tolist()  # [k+1]
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n, target[n]


def accept_coupled(draft: list[int], target_probs: torch.Tensor, noise: torch.Tensor) -> tuple[int, int]:
    """Verify a sampled draft: target_probs [k+1, V], the noise [k+1, V] of the k+1 positions (drafts drawn with
    the same noise). Returns (number accepted, next token): exactly the tokens plain sampling draws with this noise."""
    target = draw(target_probs, noise).tolist()  # [k+1]
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n, target[n]
