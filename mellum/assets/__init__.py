"""Bundled artifacts: the project's own reference model (`mellum-tiny`), the default of `complete` and `serve`."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "mellum-tiny"


def default_model_dir() -> Path:
    """`$MELLUM_MODEL` if set, else the bundled reference model; a clear error if neither exists."""
    override = os.environ.get("MELLUM_MODEL")
    if override and not Path(override).expanduser().exists():  # a hub id: downloaded, or from the hub cache
        from mellum.checkpoint import model_directory

        return model_directory(override)
    path = Path(override) if override else ASSETS / DEFAULT_MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path}: pass --model DIR (a Hugging Face checkpoint directory) or set MELLUM_MODEL"
        )
    return path
