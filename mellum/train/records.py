"""Training records in JSON Lines files: read line by line, with errors that name the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def read_jsonl(path: str | os.PathLike, missing: str, objects: bool = True) -> Iterator[tuple[str, int, object]]:
    """Yield (where, line number, record) for each non-blank line; `where` is "file:line" for error messages.
    A missing file raises FileNotFoundError with `missing` ("no chat data at ..."); text that is not UTF-8, bad
    JSON or (with `objects`) a record that is not a JSON object a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{missing} at {path}")
    with open(path, "rb") as f:  # bytes, so a decoding error knows its line
        for n, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: editors on Windows start UTF-8 files with a byte-order mark
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if objects and not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object {{...}}, got {line.strip():.40}")
            yield f"{path}:{n}", n, record
