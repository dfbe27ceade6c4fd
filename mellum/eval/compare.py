"""Compare two evaluation runs task by task: does model B beat model A on the same benchmark results?

Two runs of one benchmark (say, the bundled model before and after fine-tuning) score the same tasks, so their
per-task differences are paired: a paired bootstrap separates them where the two runs' own intervals overlap.
`mellum eval compare BASE OTHER` reads what `mellum eval` wrote (a results folder such as `runs/eval/native`, or one
results JSONL) and reports, per results file both runs have, the mean difference of every metric they share.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from mellum.eval.report import (MATCH_METRICS, TASK_METRICS, format_interval, format_value, metric_label,
                                paired_differences, task_values)


def load_runs(path: Path) -> dict[str, tuple[dict, list[dict]]]:
    """{results name: (meta, records)}: every `*.jsonl` of a results folder with its `.meta.json`, or one file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no results at {path} (a folder `mellum eval --out` wrote into, e.g. "
                                "runs/eval/native, or one of its .jsonl files)")
    runs = {}
    for file in files:
        meta_path = file.with_name(file.name + ".meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        records = []
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash, as the runner's resume treats it
        runs[file.stem] = (meta, records)
    if not runs:
        raise FileNotFoundError(f"no results files (*.jsonl) in {path}")
    return runs


def compare(base: Path, other: Path, pools: tuple[str, ...] = ()) -> list[dict]:
    """Per results file both runs have: what each side ran (model, settings) and, per metric, the mean over the
    tasks both scored of (other − base) with a paired 95% interval. Files of different benchmarks are refused.
    Each glob of `pools` adds one row over the tasks of every common file whose name matches it (e.g.
    `repo-bench_*_retrieval`: all repositories together, as small projects give too few holes alone)."""
    a, b = load_runs(base), load_runs(other)
    common = [name for name in a if name in b]
    if not common:
        raise ValueError(f"{base} and {other} share no results file (have: {', '.join(sorted(a))} vs "
                         f"{', '.join(sorted(b))}); run the same benchmark into both")
    out = []
    for name in common:
        (meta_a, records_a), (meta_b, records_b) = a[name], b[name]
        title_a, title_b = meta_a.get("benchmark", name), meta_b.get("benchmark", name)
        if title_a != title_b:
            raise ValueError(f"{name}: different benchmarks ({title_a} vs {title_b}) cannot be paired")
        out.append(_paired(name, title_a, meta_a, meta_b, records_a, records_b))
    for pattern in pools:
        matched = [name for name in common if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"--pool {pattern}: matches none of the common results files ({', '.join(common)})")
        # Task ids are unique within a file only: name each by its file.
        records_a = [dict(r, task_id=f"{name}:{r['task_id']}") for name in matched for r in a[name][1]]
        records_b = [dict(r, task_id=f"{name}:{r['task_id']}") for name in matched for r in b[name][1]]
        title = f"{pattern} ({len(matched)} files)"
        out.append(_paired(pattern, title, a[matched[0]][0], b[matched[0]][0], records_a, records_b))
    return out


def _paired(name: str, title: str, meta_a: dict, meta_b: dict, records_a: list[dict], records_b: list[dict]) -> dict:
    both = [n for n in MATCH_METRICS + TASK_METRICS if task_values(records_a, n) and task_values(records_b, n)]
    match = [n for n in both if n in MATCH_METRICS]
    # pass@1 (passed / n) where some tasks are executed: all of them, or some in a pool of both kinds (SAFIM).
    executed = not match or len(task_values(records_a, match[0])) < len(records_a)
    names = (["pass@1"] if executed else []) + match + [n for n in both if n in TASK_METRICS]
    return {"results": name, "benchmark": title, "base": _describe(meta_a), "other": _describe(meta_b),
            "metrics": paired_differences(records_a, records_b, names)}


def to_markdown(comparisons: list[dict]) -> str:
    """A table: one row per (results file, metric) with both sides' means over the paired tasks and the difference."""
    lines = ["# Paired comparison (other − base, same tasks)", ""]
    sides = {(c["base"], c["other"]) for c in comparisons}
    for base, other in sorted(sides):
        lines += [f"- base: {base}", f"- other: {other}"]
    lines += ["", "| benchmark | metric | base | other | Δ | 95% CI | tasks |", "|---|---|---|---|---|---|---|"]
    titles = [c["benchmark"] for c in comparisons]
    for c in comparisons:
        # Runs of one benchmark at several settings (cceval's budgets) share a title: name their files too.
        label = c["benchmark"] if titles.count(c["benchmark"]) == 1 else f"{c['benchmark']} [{c['results']}]"
        for name, d in c["metrics"].items():
            lines.append(f"| {label} | {metric_label(name)} | {format_value(name, d['base'])} | "
                         f"{format_value(name, d['other'])} | {format_value(name, d['delta'], signed=True)} | "
                         f"{format_interval(name, d['ci95'])} | {d['tasks']} |")
    return "\n".join(lines) + "\n"


def _describe(meta: dict) -> str:
    """Which model and settings produced a run, from its meta file."""
    who = meta.get("model") or meta.get("url") or meta.get("completer") or "unknown"
    settings = [f"{k} {meta[k]}" for k in ("n", "temperature", "seed") if k in meta]
    return f"{who}" + (f" ({', '.join(settings)})" if settings else "")
