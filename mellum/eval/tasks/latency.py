"""Serving latency: end-to-end request latency percentiles (p50/p90/p99) and throughput under concurrent clients.

Requests are real FIM completions (HumanEval-Infilling single-line prefixes and suffixes) sent to a running
server's `/v1/completions`; each concurrency level sends the same number of requests from that many threads.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mellum.eval import metrics
from mellum.eval.completer import post_json
from mellum.eval.tasks import read_jsonl

PROMPTS_FILE = Path("humaneval-infilling") / "HumanEval-SingleLineInfilling.jsonl.gz"


@dataclass(frozen=True)
class LatencyConfig:
    url: str
    model: str = ""
    concurrency: tuple[int, ...] = (1, 2, 4)
    requests: int = 32  # per level
    max_tokens: int = 32
    warmup: int = 2
    timeout_s: float = 120.0

    def __post_init__(self):
        if self.requests < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("latency needs --requests >= 1 and concurrency levels >= 1")


def measure(config: LatencyConfig, data_dir: Path) -> tuple[dict, dict[int, list[float]]]:
    """Run every concurrency level; returns (summary, latencies in ms per level)."""
    from mellum.engine.openai import completions_url

    prompts = [(row["prompt"], row["suffix"]) for row, _ in zip(read_jsonl(Path(data_dir) / PROMPTS_FILE), range(256))]
    url = completions_url(config.url)

    def one(index: int) -> tuple[float, str | None]:
        prefix, suffix = prompts[index % len(prompts)]
        body = {"model": config.model, "prompt": prefix, "suffix": suffix, "max_tokens": config.max_tokens,
                "temperature": 0.0}
        start = time.perf_counter()
        try:
            post_json(url, body, config.timeout_s)
            error = None
        except ValueError as exc:
            error = str(exc)
        return 1e3 * (time.perf_counter() - start), error

    for i in range(config.warmup):
        _, error = one(i)
        if error and i == 0:
            raise ValueError(f"the server does not answer completions: {error}")
    levels, samples = [], {}
    for level in config.concurrency:
        start = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            results = list(pool.map(one, range(config.requests)))
        wall = time.perf_counter() - start
        ok = [ms for ms, error in results if error is None]
        samples[level] = ok
        levels.append({
            "concurrency": level,
            "requests": len(results),
            "errors": len(results) - len(ok),
            "p50_ms": metrics.percentile(ok, 50),
            "p90_ms": metrics.percentile(ok, 90),
            "p99_ms": metrics.percentile(ok, 99),
            "mean_ms": sum(ok) / len(ok) if ok else float("nan"),
            "requests_per_s": len(ok) / wall if wall > 0 else float("nan"),
            "first_error": next((e for _, e in results if e), None),
        })
    summary = {"benchmark": "latency", "url": url, "tasks": config.requests, "scored": config.requests,
               "skipped": 0, "metrics": {}, "levels": levels}
    return summary, samples
