"""Server metrics: counters, gauges and latency histograms rendered in the Prometheus text format.

The Prometheus exposition format is small enough to write by hand (text format 0.0.4: `# HELP`, `# TYPE`,
one `name{labels} value` line per series, histograms as cumulative `_bucket{le=...}` plus `_sum` and
`_count`), so the server needs no extra dependency.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Latency buckets in seconds: completion targets live around 50-500 ms (Mellum paper: 90% within 500 ms).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    # Exact: `{:g}` keeps 6 digits, so a counter past 1e6 would read 1.23457e+06 and rate() would see it stand still.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


@dataclass
class Counter:
    name: str
    help: str
    values: dict[tuple, float] = field(default_factory=dict)
    kind: str = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(_key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"{self.name}{_labels(dict(k))} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines or [f"{self.name} 0"]


@dataclass
class Gauge(Counter):
    kind: str = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[_key(labels)] = float(value)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    series: dict[tuple, list] = field(default_factory=dict)  # labels -> [bucket counts..., sum, count]
    kind: str = "histogram"

    def observe(self, value: float, **labels: str) -> None:
        row = self.series.setdefault(_key(labels), [0] * len(self.buckets) + [0.0, 0])
        i = bisect.bisect_left(self.buckets, value)  # first bucket whose bound is >= value
        if i < len(self.buckets):  # above the last bound: counted only in +Inf (= count)
            row[i] += 1
        row[-2] += value
        row[-1] += 1

    def count(self, **labels: str) -> int:
        row = self.series.get(_key(labels))
        return row[-1] if row else 0

    def render(self) -> list[str]:
        lines = []
        for key, row in sorted(self.series.items()):
            labels = dict(key)
            cumulative = 0
            for bound, n in zip(self.buckets, row):
                cumulative += n
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {cumulative}")
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {row[-1]}")
            lines.append(f"{self.name}_sum{_labels(labels)} {row[-2]:.6f}")
            lines.append(f"{self.name}_count{_labels(labels)} {row[-1]}")
        return lines


class Metrics:
    """The serving metrics of one process; every update takes one lock, so handlers on any thread may record."""

    def __init__(self, namespace: str = "mellum"):
        n = namespace
        self._lock = threading.Lock()
        self.requests = Counter(f"{n}_requests_total", "Requests by endpoint and status")
        self.latency = Histogram(f"{n}_request_latency_seconds", "End-to-end completion latency by endpoint")
        self.prompt_tokens = Counter(f"{n}_prompt_tokens_total", "Prompt tokens processed")
        self.cached_tokens = Counter(f"{n}_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache")
        self.generated_tokens = Counter(f"{n}_generated_tokens_total", "Tokens generated")
        self.cache = Counter(f"{n}_suggestion_cache_total", "Suggestion cache lookups by result (hit/miss)")
        self.cancelled = Counter(f"{n}_cancelled_total", "Requests cancelled or superseded before finishing")
        self.queue_depth = Gauge(f"{n}_queue_depth", "Completion requests waiting for or running on the engine")
        self.queue_limit = Gauge(f"{n}_queue_limit", "The most completion requests queued or running before more "
                                                    "are refused (--max-queue; 0: no limit)")
        self.overloaded = Counter(f"{n}_overloaded_total", "Requests refused by endpoint because the engine's queue "
                                                           "was full (HTTP 429, an empty LSP answer)")
        self.telemetry = Counter(f"{n}_telemetry_events_total", "Telemetry events recorded by kind")
        self.telemetry_errors = Counter(f"{n}_telemetry_errors_total", "Served completions the store could not record")
        self._all = [
            self.requests, self.latency, self.prompt_tokens, self.cached_tokens, self.generated_tokens,
            self.cache, self.cancelled, self.queue_depth, self.queue_limit, self.overloaded, self.telemetry,
            self.telemetry_errors,
        ]
        self.cache_hit_rate = Gauge(f"{n}_suggestion_cache_hit_rate", "Fraction of lookups answered by the cache")

    def record(self, fn, *args, **kwargs) -> None:
        """Call one metric's update method under the lock: `metrics.record(metrics.requests.inc, endpoint=...)`."""
        with self._lock:
            fn(*args, **kwargs)

    def render(self) -> str:
        with self._lock:
            hits, misses = self.cache.get(result="hit"), self.cache.get(result="miss")
            self.cache_hit_rate.set(hits / (hits + misses) if hits + misses else 0.0)
            lines = []
            for metric in self._all + [self.cache_hit_rate]:
                lines.append(f"# HELP {metric.name} {metric.help}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
                lines.extend(metric.render())
        return "\n".join(lines) + "\n"
