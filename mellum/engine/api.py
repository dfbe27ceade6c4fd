"""The engine interface every backend implements: token ids in, generated token ids and timings out."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from mellum.engine.sampling import SamplingParams

# Why generation ended (GenerationResult.stop_reason).
STOP_REASONS = ("stop", "length", "lines", "deadline", "cancelled", "context", "error")


@dataclass
class GenerationResult:
    """One finished request. `tokens` excludes the stop token; timings are milliseconds."""

    tokens: list[int]
    stop_reason: str
    prompt_tokens: int
    cached_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    draft_tokens: int = 0  # speculative tokens proposed
    accepted_tokens: int = 0  # of which accepted

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Engine(Protocol):
    """What the completion service needs from a backend (native in-process or OpenAI-compatible remote)."""

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: threading.Event | None = None,
                 on_token: Callable[[int], None] | None = None) -> GenerationResult: ...

    def close(self) -> None: ...
