"""Training records in JSON Lines files: read line by line, with errors that name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def read_jsonl(path: str | os.PathLike, missing: str) -> Iterator[tuple[str, int, object]]:
    """Yield (where, line number, record) for each non-blank line; `where` is "file:line" for error messages.
    A missing file raises FileNotFoundError with `missing` ("no chat data at ..."); bad JSON a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{missing} at {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            yield f"{path}:{n}", n, record
