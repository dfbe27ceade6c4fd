"""The post-processing pipeline: a list of filters `(text, cursor) -> text` run in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from mellum.postprocess.block import limit_to_block
from mellum.postprocess.cursor import Cursor
from mellum.postprocess.indentation import normalize_indentation
from mellum.postprocess.midline import trim_at_line_suffix
from mellum.postprocess.repetition import drop_inline_loop, drop_repetition
from mellum.postprocess.scope import limit_lines
from mellum.postprocess.suffix import drop_suffix_overlap
from mellum.postprocess.whitespace import trim_trailing_whitespace

Filter = Callable[[str, Cursor], str]

# Order matters: decide the scope first, fix indentation before the block filter reads it, drop repetition
# and suffix duplicates from what remains, tidy whitespace last.
DEFAULT_FILTERS: tuple[Filter, ...] = (
    limit_lines,
    trim_at_line_suffix,
    normalize_indentation,
    limit_to_block,
    drop_repetition,
    drop_inline_loop,
    drop_suffix_overlap,
    trim_trailing_whitespace,
)


@dataclass(frozen=True)
class Pipeline:
    """Runs its filters in order; `ended` tells a decoder when the filters would already cut what it has."""

    filters: Sequence[Filter] = field(default_factory=lambda: DEFAULT_FILTERS)

    def __call__(self, text: str, cursor: Cursor) -> str:
        for f in self.filters:
            text = f(text, cursor)
        return text

    def ended(self, text: str, cursor: Cursor) -> bool:
        """Whether the completed lines of a partial completion already reach past where the filters cut it,
        so generating more cannot change the result (used to stop decoding early at a block's end)."""
        complete = text[: text.rfind("\n") + 1]
        if not complete.strip():
            return False
        return _count_lines(self(complete, cursor)) < _count_lines(complete)


def _count_lines(text: str) -> int:
    return 0 if not text.strip() else text.rstrip().count("\n") + 1


def pipeline(filters: Sequence[Filter] | None = None) -> Pipeline:
    """A pipeline of the given filters (the defaults when None)."""
    return Pipeline(tuple(filters) if filters is not None else DEFAULT_FILTERS)
