"""mellum: code completion with fill-in-the-middle models, from training data to the editor."""

from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, device=None):
    """Load a model from a local Hugging Face directory or a hub id (see `mellum.checkpoint`)."""
    from mellum.checkpoint import load_pretrained as _load

    return _load(path, dtype=dtype, device=device)


def save_pretrained(model, path, dtype=None, max_shard_size_mb=None) -> None:
    """Write a model as config.json + safetensors (sharded when `max_shard_size_mb` is given), loadable by transformers."""
    from mellum.checkpoint import save_pretrained as _save

    _save(model, path, dtype=dtype, max_shard_size_mb=max_shard_size_mb)
