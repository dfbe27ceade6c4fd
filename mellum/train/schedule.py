"""Training schedules: the Warmup-Hold-Decay learning-rate shape and the global batch-size ramp.

Mellum 2 (REFERENCE.md §2): 2,000 warm-up steps, a long hold at the peak, then a linear decay to zero over the
last phase; the global batch ramps from 2,048 to 4,096 sequences. Both are functions of training *progress*, so
the same shape serves a run bounded by a step count and a run bounded by a wall-clock budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-Hold-Decay: linear warm-up over `warmup_steps`, hold at 1, decay over the last `decay_fraction`.

    `decay_shape` is "linear" (Mellum 2) or "cosine"; the factor ends at `final_factor` (0 in the report).
    """

    warmup_steps: int = 2000
    decay_fraction: float = 0.2
    final_factor: float = 0.0
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.decay_shape not in ("linear", "cosine"):
            raise ValueError(f"decay_shape must be 'linear' or 'cosine', got {self.decay_shape!r}")

    def factor(self, step: int, progress: float) -> float:
        """LR multiplier at optimizer step `step` (0-based) when `progress` ∈ [0, 1] of the run is done."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_start = 1.0 - self.decay_fraction
        if progress <= decay_start or self.decay_fraction == 0.0:
            return warm
        frac = min(1.0, (progress - decay_start) / self.decay_fraction)  # 0 → 1 over the decay phase
        shape = 1.0 - frac if self.decay_shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return warm * (self.final_factor + (1.0 - self.final_factor) * shape)


@dataclass(frozen=True)
class BatchRamp:
    """Global batch size (sequences) as a step function of tokens seen: `stages` = ((tokens_from, batch), ...).

    Mellum 2 ramps 2,048 → 4,096 sequences (REFERENCE.md §2). The batch is realised by gradient accumulation,
    so every stage's batch must be a multiple of micro_batch × world_size.
    """

    stages: tuple[tuple[int, int], ...] = ((0, 8),)

    def __post_init__(self) -> None:
        if not self.stages or self.stages[0][0] != 0:
            raise ValueError("the batch ramp must start with a stage at 0 tokens")
        if any(b <= 0 for _, b in self.stages):
            raise ValueError(f"batch sizes must be positive: {self.stages}")
        if list(self.stages) != sorted(self.stages):
            raise ValueError(f"batch ramp stages must be sorted by tokens: {self.stages}")

    def batch_size(self, tokens_seen: int) -> int:
        size = self.stages[0][1]
        for start, batch in self.stages:
            if tokens_seen >= start:
                size = batch
        return size

    def accumulation_steps(self, tokens_seen: int, micro_batch: int, world_size: int) -> int:
        """Micro-batches per rank per optimizer step at this point of the run."""
        batch = self.batch_size(tokens_seen)
        per_step = micro_batch * world_size
        if batch % per_step:
            raise ValueError(
                f"global batch {batch} is not a multiple of micro_batch {micro_batch} × world_size {world_size}"
            )
        return batch // per_step


@dataclass
class Progress:
    """How far a run is: steps and tokens done, and training seconds spent (summed across resumes).

    A run ends at `max_steps`, or at `max_seconds` of training time when that is set; progress is the larger
    fraction, so a time-budgeted run decays its LR to the end of its budget.
    """

    max_steps: int
    max_seconds: float | None = None
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def fraction(self) -> float:
        by_steps = self.step / self.max_steps if self.max_steps else 0.0
        by_time = self.seconds / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self) -> bool:
        return self.fraction() >= 1.0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.seconds = int(state["step"]), int(state["tokens"]), float(state["seconds"])
