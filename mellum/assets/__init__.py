"""Bundled artifacts: the project's own reference model (`mellum-tiny`), the default of `complete` and `serve`."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "mellum-tiny"


def default_model_dir() -> Path:
    """`$MELLUM_MODEL` if set (a model directory or a hub id), else the bundled reference model; a clear error if
    neither exists."""
    from mellum.checkpoint import model_directory

    override = os.environ.get("MELLUM_MODEL")
    if override:
        try:
            return model_directory(override)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise type(exc)(f"MELLUM_MODEL={override}: {exc}") from exc
    path = ASSETS / DEFAULT_MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path}: pass --model DIR (a Hugging Face checkpoint directory) or set MELLUM_MODEL"
        )
    return path
