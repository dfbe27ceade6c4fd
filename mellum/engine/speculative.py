"""Speculative decoding rules: prompt-lookup (n-gram) drafts, the acceptance rules for greedy and sampled
decoding, and the adaptive draft length. The engine supplies the drafts from MTP or lookup and the target logits.

Greedy verification accepts a draft token exactly when it equals the target's argmax, so the output is identical
to plain greedy decoding. Sampled verification is the rejection rule of Leviathan et al. 2023 ("Fast Inference from
Transformers via Speculative Decoding", Alg. 1) and Chen et al. 2023: accept draft x with probability
min(1, p(x)/q(x)), else draw from normalize(max(p - q, 0)); the emitted tokens are distributed exactly as p.
A deterministic draft (prompt lookup) is the special case q = one-hot(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def accept_sampled(draft: list[int], target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection-sample a draft: target_probs [k+1, V]; draft_probs [k, V], or None for a deterministic draft.

    Returns (number accepted, next token): the next token comes from the residual distribution at the first
    rejection, or from the target at position k when every draft token was accepted.
    """
    device = target_probs.device
    uniforms = torch.rand(len(draft), generator=generator, device=device).tolist()
    for i, x in enumerate(draft):
        p = target_probs[i]
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        p_x = float(p[x])
        if q_x > 0 and uniforms[i] < min(1.0, p_x / q_x):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = torch.clamp(p - draft_probs[i], min=0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p  # p == q: rejection has probability 0 anyway
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(target_probs[len(draft)], 1, generator=generator))
