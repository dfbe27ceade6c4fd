"""Training metrics: one JSON line per logged step, TensorBoard scalars when installed, a tqdm progress bar.

Only rank 0 writes. The JSONL file is appended to (and flushed per line), so a resumed run continues the same
log; entries from steps after the checkpoint a run resumed from are dropped first, so the log holds each step once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class Metrics:
    """Sink for per-step scalars: `log(step, **values)`; `progress(...)` updates the bar, labelled with the training
    `stage` ("pretrain", "sft", ...); `close()` at the end."""

    def __init__(self, run_dir: str | os.PathLike | None, total_steps: int, stage: str, enabled: bool = True,
                 resume_step: int = 0, bar: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(self.path, resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
            self._tb = _tensorboard(self.path.parent / "tensorboard")
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True,
                             desc=stage, mininterval=1.0)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def progress(self, step: int, loss: float, tokens_per_s: float | None, fraction: float, elapsed_s: float) -> None:
        """Advance the bar to `step`; ETA comes from the run's progress fraction (steps or time budget). No
        throughput is shown when `tokens_per_s` is None (a stage that does not count tokens)."""
        if self._bar is None:
            return
        eta = elapsed_s * (1 - fraction) / fraction if fraction > 0 else float("nan")
        self._bar.n = step
        speed = f" · {tokens_per_s:,.0f} tok/s" if tokens_per_s is not None else ""
        self._bar.set_postfix_str(f"loss {loss:.3f}{speed} · ETA {_clock(eta)}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file. A last line cut short (the run was killed while writing it) is left
    out; any other line that is not JSON is a ValueError naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{n}: not a metrics record ({exc.msg})") from None
    return records


def _truncate_after(path: Path, step: int) -> None:
    # A run killed after logging step s > checkpoint step resumes at the checkpoint: drop the steps it redoes.
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
