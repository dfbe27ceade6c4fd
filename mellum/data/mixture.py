"""Data mixtures and curricula: phases with per-source weights, FIM rate and token budget, and a repetition cap.

A `Mixture` is planned against the tokens each source actually holds: `plan()` gives the tokens to draw from
every source in every phase and refuses a plan that would repeat any source more than `max_repeat` times over the
whole run (Mellum 2 repeats data at most 4×). `mellum data shards --mixture NAME --phase N` writes one shard
directory per phase with those quotas (documents repeated with fresh FIM draws when a source is short).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: `weights` per source label (normalised), FIM rate on code, token budget."""

    name: str
    weights: dict[str, float]
    fim_rate: float
    tokens: int

    def __post_init__(self):
        if not self.weights or any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"phase {self.name!r}: weights must be non-negative and not all zero")
        if not 0.0 <= self.fim_rate <= 1.0:
            raise ValueError(f"phase {self.name!r}: fim_rate must be in [0, 1], got {self.fim_rate}")
        if self.tokens <= 0:
            raise ValueError(f"phase {self.name!r}: tokens must be positive")

    def shares(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {source: w / total for source, w in self.weights.items()}

    def quotas(self) -> dict[str, int]:
        """Tokens to draw from each source in this phase."""
        return {source: int(round(share * self.tokens)) for source, share in self.shares().items()}


@dataclass(frozen=True)
class Mixture:
    phases: tuple[Phase, ...]
    max_repeat: float = 4.0  # no source is seen more than this many times over the whole run
    code_sources: frozenset[str] = field(default_factory=lambda: frozenset({"code"}))  # FIM applies to these only

    @property
    def sources(self) -> list[str]:
        return sorted({s for p in self.phases for s in p.weights})

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    def phase(self, key: int | str) -> Phase:
        """A phase by 1-based number or by name."""
        if isinstance(key, int) or str(key).isdigit():
            index = int(key) - 1
            if not 0 <= index < len(self.phases):
                raise ValueError(f"phase {key} does not exist (the mixture has {len(self.phases)} phases)")
            return self.phases[index]
        for p in self.phases:
            if p.name == key:
                return p
        raise ValueError(f"no phase named {key!r}; phases: {', '.join(p.name for p in self.phases)}")

    def repeats(self, available: dict[str, int]) -> dict[str, float]:
        """How many times each source is read over the whole run, given its size in tokens."""
        used: dict[str, int] = {}
        for p in self.phases:
            for source, quota in p.quotas().items():
                used[source] = used.get(source, 0) + quota
        out = {}
        for source, tokens in used.items():
            have = available.get(source, 0)
            out[source] = float("inf") if have <= 0 and tokens > 0 else (tokens / have if have else 0.0)
        return out

    def plan(self, available: dict[str, int]) -> list[dict[str, int]]:
        """Per-phase token quotas per source; ValueError if a source is missing or would repeat > max_repeat."""
        for source, times in sorted(self.repeats(available).items()):
            if times == float("inf"):
                raise ValueError(f"source {source!r} has no tokens (available: {', '.join(sorted(available)) or 'none'})")
            if times > self.max_repeat:
                raise ValueError(
                    f"source {source!r} would be repeated {times:.1f}× (limit {self.max_repeat:g}×): it holds "
                    f"{available[source]:,} tokens; add data, lower its weight or the phase token budgets"
                )
        return [p.quotas() for p in self.phases]


# Mellum 2 (REFERENCE.md §2): ~10.6T tokens in three phases, web/code/math 70/23/6 → 44/42/14 → 23/59/18 %,
# data repeated at most 4×, FIM 50/10/50 % on code. The phase lengths are not published; 6.0/3.0/1.6T is our
# assumption, the same split as mellum.train.recipes.mellum2.
MELLUM2 = Mixture(
    phases=(
        Phase("phase1", {"web": 70, "code": 23, "math": 6}, fim_rate=0.5, tokens=6_000_000_000_000),
        Phase("phase2", {"web": 44, "code": 42, "math": 14}, fim_rate=0.1, tokens=3_000_000_000_000),
        Phase("phase3", {"web": 23, "code": 59, "math": 18}, fim_rate=0.5, tokens=1_600_000_000_000),
    ),
    max_repeat=4.0,
)

# This machine: the standard library and installed packages as two sources (`mellum data build --source
# stdlib=... --source site=...`). A broad first phase, then a phase weighted to the curated standard library.
LOCAL = Mixture(
    phases=(
        Phase("broad", {"site": 0.7, "stdlib": 0.3}, fim_rate=0.5, tokens=40_000_000),
        Phase("curated", {"site": 0.3, "stdlib": 0.7}, fim_rate=0.5, tokens=10_000_000),
    ),
    max_repeat=4.0,
    code_sources=frozenset({"site", "stdlib"}),
)

MIXTURES: dict[str, Mixture] = {"mellum2": MELLUM2, "local": LOCAL}


def get_mixture(name: str) -> Mixture:
    try:
        return MIXTURES[name]
    except KeyError:
        raise ValueError(f"unknown mixture {name!r}; known: {', '.join(sorted(MIXTURES))}") from None
