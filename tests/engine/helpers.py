"""Shared pieces of the engine tests: tiny random models, the uncached greedy reference, hand-written stub models."""

from __future__ import annotations

import torch
from torch import nn

from mellum.config import get_config
from mellum.model import ModelOutput, Transformer


def tiny_model(preset: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_config(preset)).eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from full forwards without any cache (the slow path every fast path must equal)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=model.embed_tokens.weight.device)).logits[0, -1].argmax()))
    return ids[len(prompt):]


def repetitive_prompt(vocab: int, length: int, seed: int) -> list[int]:
    """Random 'code' made of a few repeated random lines, so prompt lookup finds n-grams to draft from."""
    g = torch.Generator().manual_seed(seed)
    lines = [torch.randint(0, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
             for _ in range(4)]
    out: list[int] = []
    while len(out) < length:
        out += lines[int(torch.randint(0, len(lines), (1,), generator=g))]
    return out[:length]


class StubModel(nn.Module):
    """Hand-written logits: `next_fn(token) -> logits [V]` for the main head, `draft_fn(next_token)` for MTP.

    It ignores the cache (its answers depend only on the current token), which is all the speculative
    algorithms and the scheduler need to be tested against known distributions.
    """

    def __init__(self, config, next_fn, draft_fn=None):
        super().__init__()
        self.config = config
        self.next_fn, self.draft_fn = next_fn, draft_fn
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device and dtype

    def _apply_fn(self, fn, ids: torch.Tensor) -> torch.Tensor:
        rows = [[fn(int(t)) for t in row] for row in ids]
        return torch.stack([torch.stack(r) for r in rows]).to(self.anchor.dtype)  # [B, T, V]

    def forward(self, input_ids, positions=None, cache=None, doc_ids=None):
        b, t = input_ids.shape
        hidden = torch.zeros(b, t, 4, dtype=self.anchor.dtype)
        return ModelOutput(self._apply_fn(self.next_fn, input_ids), hidden, [])

    def mtp(self, hidden, next_ids, positions=None, cache=None, return_hidden=False):
        logits = self._apply_fn(self.draft_fn, next_ids)
        return (logits, torch.zeros(*next_ids.shape, 4, dtype=self.anchor.dtype)) if return_hidden else logits


def stub_config(vocab: int, mtp: bool):
    return get_config("tiny-moe" if mtp else "tiny-dense").replace(vocab_size=vocab)


def check_graphed_decoding(preset: str, mode: str | None, compile: bool = False) -> None:
    """On CUDA in fp32, graphed decoding (and speculation) must give the uncached greedy tokens; with `compile`, the
    graphs replay the compiled layer loop."""
    from mellum.engine import NativeEngine, SamplingParams

    model = tiny_model(preset)
    engine = NativeEngine(model, device="cuda", dtype=torch.float32, speculative=mode, prefill_chunk=32,
                          compile=compile)
    assert engine._graphs is not None and (engine._graphs.step != engine._layers_forward) == compile
    try:
        for seed in range(6):
            prompt = repetitive_prompt(model.config.vocab_size, 40 + 30 * seed, seed)
            result = engine.generate(prompt, SamplingParams(max_new_tokens=24))
            assert result.tokens == reference_greedy(model, prompt, 24), (preset, mode, seed)
        assert engine._graphs is not None and engine._graphs.graphs  # graphs were captured and stayed on
    finally:
        engine.close()
