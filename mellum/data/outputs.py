"""Checks every data command makes on its output directory before it writes anything (it replaces the directory
whole at the end, so a wrong path there would lose data)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def check_output_dir(out: str | os.PathLike, force: bool, marker: str) -> None:
    """Refuse an existing `out` without `force`; with it, anything at `out` but an earlier output of this command,
    known by its `marker` file (report.json, meta.json, tokenizer.json), or an empty directory. `--force` replaces
    the directory whole: a mistyped `--out` naming a folder of one's own must not delete it."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory; choose another --out")
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if not (out / marker).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not an earlier output of this command (it has no {marker}); --force "
                              "replaces only such an output, never another directory: choose another --out")


def refuse_inside(out: str | os.PathLike, source: str | os.PathLike, what: str) -> None:
    """Refuse an `out` that is or contains `source` (the command's input, named `what`): replacing it deletes it."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise ValueError(f"--out {out} is or contains the {what} {source}; write the output somewhere else")


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished output `tmp` at `out`: an earlier output there is renamed aside first and deleted only once
    the new one is in place, so a crash in between leaves one of the two, never neither."""
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)
