"""`mellum eval`: run a benchmark against the native model, an OpenAI-compatible server, or a harness check."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUBCOMMANDS = {
    "humaneval-infilling": "HumanEval-Infilling: FIM holes in HumanEval solutions, executed with the tests (pass@k)",
    "safim": "SAFIM: syntax-aware FIM; block/control executed on unit tests (Python, C++, Java), api by match",
    "cceval": "CrossCodeEval subset: next line with cross-file context (exact match, edit similarity, identifiers)",
    "humaneval": "HumanEval: complete a function from its docstring, run the tests (pass@k)",
    "humaneval-plus": "HumanEval+: HumanEval with EvalPlus's extra tests (base and plus pass@k)",
    "mbpp-plus": "MBPP+: EvalPlus's MBPP with extra tests (base and plus pass@k)",
    "repo-bench": "repository-level next-line completion built from a repository on disk (--repo DIR)",
    "latency": "serving latency (p50/p90/p99) under concurrency against a running server (--url)",
    "compare": "compare two runs of the same benchmarks task by task (e.g. a model before and after fine-tuning): "
               "paired differences with bootstrap confidence intervals",
}
SPLITS = {
    "humaneval-infilling": ("single-line", "multi-line", "random-span", "random-span-light"),
    "safim": ("block", "control", "api"),
    "cceval": ("provided", "none", "packed"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure a model on public benchmarks (data read from --data, $MELLUM_BENCHMARKS or ../shared/benchmarks). "
        "Check the harness first with --oracle (the benchmark's own solutions: must score 100%) or --check "
        "empty|wrong. Results are resumable JSONL files, one line per task, under --out; the summary is written as "
        "JSON and Markdown with 95% intervals, plus PNG plots."
    )
    subs = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name == "latency":
            _latency_arguments(sub)
            continue
        if name == "compare":
            sub.add_argument("base", metavar="BASE", help="results of the baseline: a folder `mellum eval` wrote "
                                                          "(e.g. runs/eval/native) or one results .jsonl")
            sub.add_argument("other", metavar="OTHER", help="results of the run compared with it (same layout)")
            sub.add_argument("--pool", action="append", default=[], metavar="GLOB",
                             help="also one row over all results files matching GLOB (repeatable), e.g. "
                                  "'repo-bench_*_retrieval' for every repository together")
            sub.add_argument("--json", metavar="FILE", help="also write the comparison as JSON here")
            continue
        _common_arguments(sub)
        if name in SPLITS:
            default = "all" if name == "cceval" else SPLITS[name][0]
            sub.add_argument("--split", choices=[*SPLITS[name], "all"], default=default,
                             help=f"which split (default: {default}; 'all' runs each in turn)")
        if name == "cceval":
            sub.add_argument("--budgets", default="", metavar="T,T,...",
                             help="also run the packed setting at these context budgets (tokens) and plot the curve")
        if name == "repo-bench":
            sub.add_argument("--repo", required=True, action="append", metavar="DIR",
                             help="repository to build tasks from (repeatable: each is scored, then all pooled)")
            sub.add_argument("--tasks", type=int, default=100, metavar="N", help="tasks to build (default 100)")
            sub.add_argument("--budget", type=int, default=1024, metavar="T",
                             help="context budget in tokens (default 1024)")
            sub.add_argument("--setting", choices=["none", "path", "retrieval", "all"], default="all",
                             help="context setting: none, path-distance files, full retrieval + packing (default: all)")


def _common_arguments(sub: argparse.ArgumentParser) -> None:
    who = sub.add_mutually_exclusive_group()
    who.add_argument("--model", metavar="DIR",
                     help="model directory or hub id (default: $MELLUM_MODEL or the bundled model)")
    who.add_argument("--url", metavar="URL", help="OpenAI-compatible server (POST URL/v1/completions)")
    who.add_argument("--oracle", dest="check", action="store_const", const="oracle",
                     help="use the benchmark's canonical solutions (a correct harness scores 100%%)")
    who.add_argument("--check", choices=["oracle", "empty", "wrong"],
                     help="harness check: canonical, empty or deliberately wrong completions")
    sub.add_argument("--prompt-format", metavar="NAME",
                     help="with --url: render prompts in this format (mellum, starcoder2, qwen2.5-coder, ...) and "
                          "send them raw; default: send prompt=prefix and suffix and let the server format")
    sub.add_argument("--served-model", default="", metavar="NAME", help="with --url: the `model` field to send")
    sub.add_argument("--data", metavar="DIR", help="benchmark data folder (default: $MELLUM_BENCHMARKS or "
                                                   "../shared/benchmarks beside the repository)")
    sub.add_argument("--out", default="runs/eval", metavar="DIR", help="results folder (default: runs/eval)")
    sub.add_argument("--json", metavar="FILE", help="also write the summary JSON here")
    sub.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N tasks")
    sub.add_argument("--lang", action="append", default=[], metavar="LANG",
                     help="only tasks in this language (repeatable): python, cpp, java, csharp")
    sub.add_argument("--workers", type=int, default=1, metavar="N", help="tasks run in parallel (default 1)")
    sub.add_argument("--n", type=int, default=1, metavar="N", help="samples per task (default 1 = greedy)")
    sub.add_argument("--k", default="1", metavar="K,K,...", help="pass@k values to report (k <= n; default 1)")
    sub.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature (default 0 for n=1, 0.8 for n>1)")
    sub.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling when sampling")
    sub.add_argument("--seed", type=int, default=0, help="run seed: each (task, sample) gets a seed derived from it")
    sub.add_argument("--timeout", type=float, default=None, metavar="S", help="sandbox time limit per program run")
    sub.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    sub.add_argument("--nll", action="store_true",
                     help="also score the reference's negative log-likelihood (nats/token) after the same prompt "
                          "(--model only): tells context settings and models apart where a small model's exact "
                          "matches and passes are too rare to do so")
    sub.add_argument("--device", default="cpu", help="torch device for --model (default cpu)")
    sub.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only quantization for --model")
    sub.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")


def _latency_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--url", required=True, metavar="URL", help="server base URL (POST URL/v1/completions)")
    sub.add_argument("--served-model", default="", metavar="NAME", help="the `model` field to send")
    sub.add_argument("--concurrency", default="1,2,4", metavar="C,C,...",
                     help="parallel clients per level (default 1,2,4)")
    sub.add_argument("--requests", type=int, default=32, metavar="N",
                     help="requests per concurrency level (default 32)")
    sub.add_argument("--max-tokens", type=int, default=32, metavar="N", help="max_tokens per request (default 32)")
    sub.add_argument("--warmup", type=int, default=2, metavar="N", help="unmeasured requests first (default 2)")
    sub.add_argument("--data", metavar="DIR", help="benchmark data folder (prompts from HumanEval-Infilling)")
    sub.add_argument("--out", default="runs/eval", metavar="DIR", help="results folder (default: runs/eval)")
    sub.add_argument("--json", metavar="FILE", help="also write the summary JSON here")
    sub.add_argument("--no-plots", action="store_true", help="skip the PNG plot")


def run(args) -> int:
    if args.benchmark == "latency":
        return _run_latency(args)
    if args.benchmark == "compare":
        return _run_compare(args)
    from mellum.eval.completer import Sampling, make_completer
    from mellum.eval.report import to_markdown, write_report
    from mellum.eval.runner import RunConfig
    from mellum.eval.sandbox import Sandbox, SandboxConfig

    ks = _ints(args.k, "--k")
    if max(ks) > args.n:
        raise ValueError(f"pass@{max(ks)} needs --n {max(ks)} or more samples per task (got --n {args.n})")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    config = RunConfig(n=args.n, limit=args.limit, workers=args.workers, languages=tuple(args.lang),
                       sampling=Sampling(temperature, args.top_p, args.seed), fresh=args.fresh, nll=args.nll)
    sandbox_config = SandboxConfig() if args.timeout is None else SandboxConfig(timeout_s=args.timeout)
    completer = make_completer(args.check, model=args.model, url=args.url, prompt_format=args.prompt_format,
                               served_model=args.served_model, device=args.device, quantize=args.quantize)
    out = Path(args.out) / completer.name
    try:
        summaries = _run_benchmarks(args, completer, config, Sandbox(sandbox_config), out, ks)
    finally:
        completer.close()
    written = write_report(summaries, out, args.json, plots=not args.no_plots)
    sections = to_markdown(summaries).split("\n## ")  # the tables; failing tasks stay in the files
    print("\n## ".join([sections[0]] + [x for x in sections[1:] if x.startswith("Paired")]))
    print(f"summary: {written['json']}  report: {written['markdown']}", file=sys.stderr)
    return 0


def _run_benchmarks(args, completer, config, sandbox, out: Path, ks: list[int]) -> list[dict]:
    from mellum.eval import runner
    from mellum.eval.report import summarize
    from mellum.eval.tasks import benchmarks_dir

    if args.benchmark == "repo-bench":
        from mellum.eval.tasks.repo_bench import SETTINGS, RepoBench

        settings = SETTINGS if args.setting == "all" else (args.setting,)
        names = [Path(repo).resolve().name for repo in args.repo]
        if len(set(names)) < len(names):
            raise ValueError(f"--repo folders must have different names (results are filed by name): {names}")
        counting = _counting(completer)
        benches = [RepoBench(repo, s, tasks=args.tasks, budget=args.budget, **counting)
                   for repo in args.repo for s in settings]
    else:
        data = benchmarks_dir(args.data)
        splits = SPLITS.get(args.benchmark, (None,))
        chosen = splits if getattr(args, "split", None) in (None, "all") else (args.split,)
        benches = [_make(args.benchmark, data, split, completer, args.lang) for split in chosen]
        if args.benchmark == "cceval" and args.budgets:
            for budget in _ints(args.budgets, "--budgets"):
                bench = _make("cceval", data, "packed", completer, args.lang)
                bench.context_tokens = budget
                bench.budget_label = budget
                benches.append(bench)
    if args.timeout is not None:  # the user's limit wins over each benchmark's own
        for bench in benches:
            bench.timeout_s = bench.run_timeout_s = args.timeout
    summaries, runs = [], []
    for bench in benches:
        slug = bench.title.replace("/", "_") + (f"_{bench.budget_label}" if hasattr(bench, "budget_label") else "")
        start = time.monotonic()
        records = runner.run(bench, completer, out / f"{slug}.jsonl", config, sandbox, progress=not args.quiet)
        extra = {"results": str(out / f"{slug}.jsonl"), **completer.describe()}
        if hasattr(bench, "budget_label"):
            extra["context_budget"] = bench.budget_label
        summaries.append(summarize(records, bench.title + (f"@{bench.budget_label}" if "context_budget" in extra else ""),
                                   bench.scoring, ks, time.monotonic() - start, extra))
        runs.append((bench, records))
    _compare_with_no_context(summaries, runs)
    if args.benchmark == "repo-bench" and len(args.repo) > 1:
        summaries += _pooled_repo_bench(runs, ks)
    if args.benchmark == "cceval" and args.budgets and not args.no_plots:
        _budget_curve(summaries, out)
    if args.benchmark == "safim" and len(summaries) == 3:
        summaries.append(_safim_average(summaries))
    return summaries


def _compare_with_no_context(summaries: list[dict], runs: list[tuple]) -> None:
    """Each context setting of cceval / repo-bench against the no-context run of the same tasks (the same
    repository), paired per task."""
    from mellum.eval.report import paired_differences

    bases = {getattr(bench, "repo", None): (bench, records) for bench, records in runs if bench.split == "none"}
    for summary, (bench, records) in zip(summaries, runs):
        base = bases.get(getattr(bench, "repo", None))
        if base is not None and bench is not base[0] and bench.scoring == "match":
            summary["vs_base"] = {"baseline": base[0].title, "metrics": paired_differences(base[1], records)}


def _pooled_repo_bench(runs: list[tuple], ks: list[int]) -> list[dict]:
    """repo-bench/all/<setting>: the tasks of every repository together (task ids name their repository), with
    the paired comparison against no context over all of them."""
    from mellum.eval.report import paired_differences, summarize

    pooled: dict[str, list[dict]] = {}
    for bench, records in runs:
        pooled.setdefault(bench.split, []).extend(records)
    repos = sorted({bench.repo.name for bench, _ in runs})
    summaries = []
    for setting, records in pooled.items():
        summary = summarize(records, f"repo-bench/all/{setting}", "match", ks, extra={"repositories": repos})
        if setting != "none" and "none" in pooled:
            summary["vs_base"] = {"baseline": "repo-bench/all/none", "metrics": paired_differences(pooled["none"], records)}
        summaries.append(summary)
    return summaries


def _safim_average(summaries: list[dict]) -> dict:
    """SAFIM's headline: the mean of block pass@1, control pass@1 and api match (Gong et al. 2024); its interval
    combines the three splits' standard errors (independent samples)."""
    from mellum.eval.report import PUBLISHED

    heads = [s["metrics"].get("pass@1") or s["metrics"].get("exact_match") for s in summaries]
    heads = [h for h in heads if h]
    value = sum(h["value"] for h in heads) / len(heads)
    se = sum(((h["ci95"][1] - h["ci95"][0]) / (2 * 1.96)) ** 2 for h in heads) ** 0.5 / len(heads)
    return {"benchmark": "safim/average", "tasks": sum(s["tasks"] for s in summaries),
            "scored": sum(s["scored"] for s in summaries), "skipped": sum(s["skipped"] for s in summaries),
            "metrics": {"pass@1": {"value": value, "ci95": [max(0.0, value - 1.96 * se), min(1.0, value + 1.96 * se)]}},
            "published": PUBLISHED["safim/average"], "failures": 0, "failing_tasks": []}


def _make(name: str, data: Path, split, completer, languages=()):
    from mellum.eval.tasks import get_benchmark

    if name == "cceval":
        from mellum.eval.tasks.cceval import CrossCodeEval

        if len(languages) > 1:
            raise ValueError("cceval takes one --lang at a time (python or csharp)")
        language = languages[0] if languages else "python"
        return CrossCodeEval(data, split, language=language, **_counting(completer))
    return get_benchmark(name, data, split)


def _counting(completer) -> dict:
    """How a benchmark packing context for `completer` counts tokens: as its prompt is encoded when it has a
    tokenizer (code as plain text, control tokens only from the format's literals), in its prompt format when it
    has one; the benchmark's approximations otherwise."""
    out = {}
    if completer.count_tokens("x") is not None:
        out.update(count_tokens=completer.count_tokens, count_segments=completer.count_segments)
    if completer.prompt_format is not None:
        out["prompt_format"] = completer.prompt_format
    return out


def _budget_curve(summaries: list[dict], out: Path) -> None:
    from mellum.eval.report import plot_curve

    points = sorted((s["context_budget"], s["metrics"]) for s in summaries if "context_budget" in s)
    if not points:
        return
    names = ("exact_match", "edit_similarity", "identifier_f1")
    series = {n: [100 * m[n]["value"] for _, m in points if n in m] for n in names}
    plot_curve([b for b, _ in points], series, out / "cceval_budget.png", "context budget (tokens)", "%",
               "CrossCodeEval vs context budget (our packer)")


def _run_compare(args) -> int:
    import json

    from mellum.eval.compare import compare, to_markdown

    comparisons = compare(Path(args.base), Path(args.other), tuple(args.pool))
    print(to_markdown(comparisons))
    if args.json:
        Path(args.json).write_text(json.dumps({"comparisons": comparisons}, indent=2) + "\n", encoding="utf-8")
    return 0


def _run_latency(args) -> int:
    from mellum.eval.report import plot_latency, write_report
    from mellum.eval.tasks import benchmarks_dir
    from mellum.eval.tasks.latency import LatencyConfig, measure

    levels = _ints(args.concurrency, "--concurrency")
    config = LatencyConfig(url=args.url, model=args.served_model, concurrency=tuple(levels), requests=args.requests,
                           max_tokens=args.max_tokens, warmup=args.warmup)
    summary, samples = measure(config, benchmarks_dir(args.data))
    out = Path(args.out) / "latency"
    write_report([summary], out, args.json, plots=False)
    if not args.no_plots:
        plot_latency({f"concurrency {c}": v for c, v in samples.items()}, out / "latency.png")
    for level in summary["levels"]:
        print(f"concurrency {level['concurrency']:>3}: p50 {level['p50_ms']:.1f} ms  p90 {level['p90_ms']:.1f} ms  "
              f"p99 {level['p99_ms']:.1f} ms  {level['requests_per_s']:.2f} req/s  errors {level['errors']}")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return values
