"""Project context: index a workspace, collect candidate chunks, and pack the best under a token budget."""

from mellum.context.config import ContextConfig
from mellum.context.index import ProjectIndex
from mellum.context.packer import ContextPacker, ContextPiece, PackResult, pack_chunks, trim_prefix, trim_suffix

__all__ = [
    "ContextConfig", "ProjectIndex", "ContextPacker", "ContextPiece", "PackResult", "pack_chunks", "trim_prefix",
    "trim_suffix",
]
