"""Report: turns per-task records into a summary (JSON and Markdown with 95% intervals) and PNG plots.

Metric names follow the benchmark README: `pass@k` for execution benchmarks (fractions in [0, 1]; the Markdown
shows percent, like the published numbers), `exact_match`, `edit_similarity`, `identifier_em`, `identifier_f1`
for match benchmarks, and `reference_nll` (nats/token, with `--nll`). pass@1 with one sample per task gets a Wilson
interval; everything else a bootstrap over tasks. Settings of one benchmark on the same tasks (context or not) are
also compared pairwise (`paired_differences`), which separates them where the separate intervals overlap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from mellum.eval import metrics

# Published scores for scale (REFERENCE.md §1, JetBrains/Mellum-4b-base model card).
PUBLISHED = {
    "humaneval-infilling/single-line": {"Mellum-4b-base": 66.21, "Mellum-4b-sft-python": 80.45},
    "humaneval-infilling/multi-line": {"Mellum-4b-base": 38.52, "Mellum-4b-sft-python": 48.19},
    "safim/average": {"Mellum-4b-base": 38.11, "Mellum-4b-sft-python": 42.12},
}
MAX_LISTED_FAILURES = 200
MATCH_METRICS = ["exact_match", "edit_similarity", "identifier_em", "identifier_f1"]
# Metrics kept once per task (not per sample), in their own units: mean negative log-likelihood of the reference
# in nats/token (`--nll`), lower is better.
TASK_METRICS = ["reference_nll"]


def summarize(records: Sequence[dict], title: str, scoring: str = "execution", ks: Sequence[int] = (1,),
              seconds: float | None = None, extra: dict | None = None) -> dict:
    """The summary of one run: task counts, metrics with intervals, per-language breakdown, failing tasks."""
    scored = [r for r in records if not r.get("skipped")]
    summary: dict = {
        "benchmark": title,
        "tasks": len(records),
        "scored": len(scored),
        "skipped": len(records) - len(scored),
        "metrics": _metrics(scored, scoring, ks),
    }
    languages = sorted({r.get("language", "") for r in records})
    if len(languages) > 1:
        summary["by_language"] = {}
        for lang in languages:
            group = [r for r in records if r.get("language") == lang]
            kept = [r for r in group if not r.get("skipped")]
            entry = {"tasks": len(group), "scored": len(kept)}
            if kept:
                entry["metrics"] = _metrics(kept, scoring, ks)
            else:
                entry["skipped_reason"] = group[0]["results"][0].get("reason", "")
            summary["by_language"][lang] = entry
    failures = [
        {"task_id": r["task_id"], "reason": next((x["reason"] for x in r["results"] if not x["passed"]), "")}
        for r in scored
        if r["passed"] < r["n"]
    ]
    summary["failures"] = len(failures)
    summary["failing_tasks"] = failures[:MAX_LISTED_FAILURES]
    if seconds is not None:
        summary["seconds"] = round(seconds, 1)
    if title in PUBLISHED:
        summary["published"] = PUBLISHED[title]
    if extra:
        summary.update(extra)
    return summary


def _metrics(records: Sequence[dict], scoring: str, ks: Sequence[int]) -> dict:
    out: dict = {}
    if not records:
        return out
    if scoring == "execution":
        counts = [(r["n"], r["passed"]) for r in records]
        n_min = min(n for n, _ in counts)
        for k in ks:
            if k > n_min:
                continue  # no unbiased estimate with fewer samples than k
            per_task = [metrics.pass_at_k(n, c, k) for n, c in counts]
            value = sum(per_task) / len(per_task)
            if n_min == 1 and k == 1:
                ci = metrics.wilson_interval(sum(per_task), len(per_task))
            else:
                ci = metrics.bootstrap_interval(per_task)
            out[f"pass@{k}"] = {"value": value, "ci95": list(ci)}
    # Per-sample metrics (match scores, EvalPlus "base"), averaged per task, then over tasks.
    names = sorted({name for r in records for x in r["results"] for name in x.get("metrics", {})})
    for name in names + [n for n in TASK_METRICS if any(n in r for r in records)]:
        per_task = list(task_values(records, name).values())
        if not per_task:
            continue
        key = "base_pass@1" if name == "base" else name
        binary = name not in TASK_METRICS and all(v in (0.0, 1.0) for v in per_task)
        ci = metrics.wilson_interval(sum(per_task), len(per_task)) if binary else metrics.bootstrap_interval(per_task)
        out[key] = {"value": sum(per_task) / len(per_task), "ci95": list(ci)}
    return out


def task_values(records: Sequence[dict], name: str) -> dict[str, float]:
    """{task_id: value} of one metric: a per-sample metric averaged over the task's samples, a per-task one
    (`reference_nll`), or `pass@1` (passed / n). Tasks without it are left out."""
    out = {}
    for r in records:
        if name == "pass@1":  # the share of the task's samples that passed: pass@1's unbiased estimate
            out[r["task_id"]] = r["passed"] / r["n"]
            continue
        if name in TASK_METRICS:
            if r.get(name) is not None:
                out[r["task_id"]] = float(r[name])
            continue
        values = [x["metrics"][name] for x in r["results"] if name in x.get("metrics", {})]
        if values:
            out[r["task_id"]] = sum(values) / len(values)
    return out


def paired_differences(base: Sequence[dict], other: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """Per metric, the mean of (other − base) over the tasks both runs scored, with a paired bootstrap 95% interval,
    and each side's own mean over those tasks: the same holes under two settings (e.g. with and without context)
    differ far less than their separate intervals suggest."""
    base = [r for r in base if not r.get("skipped")]
    other = [r for r in other if not r.get("skipped")]
    if names is None:
        names = [n for n in MATCH_METRICS + TASK_METRICS if task_values(base, n)]
    out = {}
    for name in names:
        a, b = task_values(base, name), task_values(other, name)
        common = [t for t in a if t in b]
        if not common:
            continue
        deltas = [b[t] - a[t] for t in common]
        out[name] = {"delta": sum(deltas) / len(deltas), "ci95": list(metrics.bootstrap_interval(deltas)),
                     "tasks": len(common), "base": sum(a[t] for t in common) / len(common),
                     "other": sum(b[t] for t in common) / len(common)}
    return out


def to_markdown(summaries: Sequence[dict]) -> str:
    """A Markdown report: one table row per (benchmark, metric), values in percent with 95% intervals."""
    lines = ["| benchmark | metric | value (%) | 95% CI | tasks | published (%) |", "|---|---|---|---|---|---|"]
    for s in summaries:
        published = ", ".join(f"{k} {v}" for k, v in s.get("published", {}).items())
        for name, m in s["metrics"].items():
            lines.append(f"| {s['benchmark']} | {metric_label(name)} | {format_value(name, m['value'])} | "
                         f"{format_interval(name, m['ci95'])} | {s['scored']} | {published} |")
            published = ""
        for lang, entry in s.get("by_language", {}).items():
            if "metrics" not in entry:
                lines.append(f"| {s['benchmark']} [{lang}] | skipped | — | — | {entry['tasks']} | "
                             f"{entry.get('skipped_reason', '')} |")
                continue
            for name, m in entry["metrics"].items():
                lines.append(f"| {s['benchmark']} [{lang}] | {metric_label(name)} | {format_value(name, m['value'])} | "
                             f"{format_interval(name, m['ci95'])} | {entry['scored']} | |")
    out = ["# Evaluation summary", "", *lines, ""]
    paired = [s for s in summaries if s.get("vs_base")]
    if paired:
        out += ["## Paired differences (same tasks, setting − baseline)", "",
                "| benchmark | baseline | metric | Δ | 95% CI | tasks |", "|---|---|---|---|---|---|"]
        for s in paired:
            for name, d in s["vs_base"]["metrics"].items():
                out.append(f"| {s['benchmark']} | {s['vs_base']['baseline']} | {metric_label(name)} | "
                           f"{format_value(name, d['delta'], signed=True)} | {format_interval(name, d['ci95'])} "
                           f"| {d['tasks']} |")
        out.append("")
    for s in summaries:
        if s.get("levels"):
            out += [f"## latency: {s.get('url', '')}", "",
                    "| concurrency | requests | errors | p50 ms | p90 ms | p99 ms | req/s |", "|---|---|---|---|---|---|---|"]
            out += [f"| {l['concurrency']} | {l['requests']} | {l['errors']} | {l['p50_ms']:.1f} | {l['p90_ms']:.1f} "
                    f"| {l['p99_ms']:.1f} | {l['requests_per_s']:.2f} |" for l in s["levels"]]
            out.append("")
    for s in summaries:
        if s.get("failing_tasks"):
            out += [f"## {s['benchmark']}: {s['failures']} failing task(s)", ""]
            out += [f"- `{f['task_id']}`: {f['reason'][:160]}" for f in s["failing_tasks"][:50]]
            if s["failures"] > 50:
                out.append(f"- … {s['failures'] - 50} more in summary.json / the results JSONL")
            out.append("")
    return "\n".join(out)


def metric_label(name: str) -> str:
    return f"{name} (nats/token)" if name in TASK_METRICS else name


def format_value(name: str, value: float, signed: bool = False) -> str:
    """Percent for scores in [0, 1]; as measured for the per-task metrics in their own units."""
    sign = "+" if signed else ""
    return f"{value:{sign}.3f}" if name in TASK_METRICS else f"{100 * value:{sign}.2f}"


def format_interval(name: str, ci: Sequence[float]) -> str:
    lo, hi = ci
    if name in TASK_METRICS:
        return f"{lo:.3f}–{hi:.3f}"
    return f"{round(100 * lo, 1) + 0.0:.1f}–{round(100 * hi, 1) + 0.0:.1f}"  # + 0.0: no "-0.0"


def write_report(summaries: Sequence[dict], out_dir: Path, json_file: Path | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write summary.json, summary.md and plots into `out_dir`, and this run's summaries to `json_file`.

    `out_dir` collects the benchmarks run into it: a summary already there for another benchmark is kept, one for a
    benchmark run again is replaced (in place), so `mellum eval humaneval` then `mellum eval safim` into one
    `--out` report both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "summary.json", "markdown": out_dir / "summary.md"}
    if json_file:
        write_atomic(Path(json_file), json.dumps({"summaries": list(summaries)}, indent=2) + "\n")
        written["json_file"] = Path(json_file)
    summaries = _merged(_read_summaries(written["json"]), summaries)
    write_atomic(written["json"], json.dumps({"summaries": summaries}, indent=2) + "\n")
    write_atomic(written["markdown"], to_markdown(summaries))
    if plots:
        png = plot_scores(summaries, out_dir / "scores.png")
        if png:
            written["plot"] = png
    return written


def _read_summaries(path: Path) -> list[dict]:
    """The summaries of an earlier summary.json; none when it is missing or unreadable (it is rewritten whole)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get("summaries")
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in found if isinstance(s, dict) and "benchmark" in s] if isinstance(found, list) else []


def _merged(earlier: list[dict], new: Sequence[dict]) -> list[dict]:
    """`earlier` with each benchmark of `new` replaced in place, and `new`'s other benchmarks appended."""
    fresh = {s["benchmark"]: s for s in new}
    merged = [fresh.pop(s["benchmark"], s) for s in earlier]
    return merged + [s for s in new if s["benchmark"] in fresh]


def plot_scores(summaries: Sequence[dict], path: Path) -> Path | None:
    """Bar chart of the headline metric per benchmark/split (and per language) with 95% interval whiskers."""
    bars = []
    for s in summaries:
        groups = s.get("by_language") or {}
        entries = [(s["benchmark"], s["metrics"])] + [
            (f"{s['benchmark']} [{lang}]", e["metrics"]) for lang, e in groups.items() if "metrics" in e
        ]
        for label, m in entries:
            name = next((n for n in ("pass@1", "exact_match") if n in m), next(iter(m), None))
            if name:
                bars.append((f"{label}\n{name}", m[name]["value"], m[name]["ci95"]))
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(bars)), 4.2))
    values = [100 * v for _, v, _ in bars]
    errors = [[max(0.0, 100 * (v - lo)) for _, v, (lo, hi) in bars], [max(0.0, 100 * (hi - v)) for _, v, (lo, hi) in bars]]
    ax.bar(range(len(bars)), values, yerr=errors, capsize=4, color="#4c78a8")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("scores with 95% intervals")
    fig.tight_layout()
    return _save(fig, path)


def plot_curve(xs: Sequence[float], series: dict[str, Sequence[float]], path: Path, xlabel: str, ylabel: str,
               title: str) -> Path:
    """Line plot of several series over a common x (context-budget curves)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(latencies_ms: dict[str, Sequence[float]], path: Path) -> Path:
    """Latency distributions per concurrency level: empirical CDFs with p50/p90/p99 marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, values in latencies_ms.items():
        ordered = sorted(values)
        if not ordered:
            continue
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("request latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
