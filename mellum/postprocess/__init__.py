"""Completion post-processing: small string filters, each with golden cases, run as a pipeline."""

from __future__ import annotations

from mellum.postprocess.block import limit_to_block
from mellum.postprocess.cursor import Cursor
from mellum.postprocess.indentation import normalize_indentation
from mellum.postprocess.midline import trim_at_line_suffix
from mellum.postprocess.pipeline import DEFAULT_FILTERS, Filter, Pipeline, pipeline
from mellum.postprocess.repetition import drop_inline_loop, drop_repetition
from mellum.postprocess.scope import is_multiline, limit_lines
from mellum.postprocess.suffix import drop_suffix_overlap
from mellum.postprocess.whitespace import trim_trailing_whitespace

__all__ = [
    "Cursor",
    "DEFAULT_FILTERS",
    "Filter",
    "Pipeline",
    "drop_inline_loop",
    "drop_repetition",
    "drop_suffix_overlap",
    "is_multiline",
    "limit_lines",
    "limit_to_block",
    "normalize_indentation",
    "pipeline",
    "trim_at_line_suffix",
    "trim_trailing_whitespace",
]
