"""Speed of project context on the standard library's tree: index build time and memory, then context
collection (sources → ranking → packing under a token budget) per request, p50/p90 against the 30 ms goal.

Two request mixes: "cold" (a random file and cursor each time: nothing cached for that file) and "keystrokes"
(typing in one file: what an editor sends, where caches hit). Runs on CPU only.

    python benchmarks/context_speed.py                       # the stdlib of this Python
    python benchmarks/context_speed.py --root DIR --tokenizer DIR --budget 4096 --requests 200
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sysconfig
import time
from pathlib import Path

GOAL_P90_MS = 30.0


def _tokenizer(path: str | None, vocab: int):
    from mellum.tokenizer import Tokenizer, train_bpe

    if path:
        return Tokenizer.from_pretrained(path), f"loaded from {path}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:40]
    tok = train_bpe([f.read_text(encoding="utf-8", errors="replace") for f in files], vocab_size=vocab)
    return tok, f"byte-level BPE, {vocab} tokens, trained on {len(files)} stdlib modules"


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    # Nearest rank, so p90 is never below the (interpolated) median however few requests there are.
    return statistics.median(ordered), ordered[math.ceil(0.9 * len(ordered)) - 1], max(ordered)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="project to index (default: the stdlib Lib/ tree)")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: train a BPE on stdlib modules)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the trained tokenizer")
    parser.add_argument("--budget", type=int, default=4096, help="prompt token budget per request")
    parser.add_argument("--requests", type=int, default=200, help="requests per mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests must be at least 1: {args.requests}")
    if args.budget < 1:  # checked here: the packer would refuse it only after the whole project is indexed
        parser.error(f"--budget must be at least 1: {args.budget}")
    if not Path(args.root).is_dir():
        parser.error(f"--root {args.root} is not a directory")

    from mellum.context import ContextConfig, ContextPacker, ProjectIndex

    tok, described = _tokenizer(args.tokenizer, args.vocab)
    print(f"tokenizer: {described}")

    gc.collect()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    index = ProjectIndex(args.root, ContextConfig())
    build_s = time.perf_counter() - t0
    gc.collect()
    index_mb = _rss_mb() - rss0
    stats = index.stats()
    text_mb = sum(len(e.text) for e in index.files.values()) / 2**20
    print(f"index: {args.root}")
    print(f"  {stats['files']} files ({text_mb:.1f} MiB of text), {stats['chunks']} chunks, {stats['terms']} terms, "
          f"{stats['definitions']} definitions; skipped {dict(index.skipped)}")
    print(f"  build {build_s:.2f} s ({1e3 * build_s / max(stats['files'], 1):.2f} ms/file); "
          f"memory +{index_mb:.0f} MiB RSS ({index_mb / max(text_mb, 1e-9):.1f}x the text)")

    rng = random.Random(args.seed)
    files = sorted(p for p, e in index.files.items() if e.language == "python" and e.text.count("\n") > 20)
    if not files:
        raise SystemExit(f"error: no Python file over 20 lines under {args.root} to place a cursor in")

    def cursor(path: str) -> tuple[str, str]:
        text = index.files[path].text
        lines = text.split("\n")
        line = rng.randrange(5, len(lines) - 1)
        start = sum(len(x) + 1 for x in lines[:line])
        col = rng.randrange(0, len(lines[line]) + 1)
        return text[: start + col], text[start + col :]

    packer = ContextPacker.for_tokenizer(index, tok, index.config)  # counted as the service counts
    # Warm up (first tree-sitter parser load, numpy paths), not counted.
    for path in rng.sample(files, min(5, len(files))):
        packer.pack(path, *cursor(path), args.budget)

    mixes: dict[str, list[dict]] = {"cold": [], "keystrokes": []}
    for _ in range(args.requests):
        path = rng.choice(files)
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        neighbours = [p for p in files if p.startswith(folder)][:3]
        mixes["cold"].append(packer.pack(path, *cursor(path), args.budget, open_files=neighbours).timings_ms)
    typed = "result = self.value + compute_total(items)"
    per_file = 20
    for i in range(args.requests):  # a new file and cursor every `per_file` keystrokes
        if i % per_file == 0:
            path = rng.choice(files)
            prefix, suffix = cursor(path)
        typing = prefix + typed[: i % per_file + 1]
        mixes["keystrokes"].append(packer.pack(path, typing, suffix, args.budget).timings_ms)

    print(f"context collection per request, budget {args.budget} tokens (ms):")
    for name, timings in mixes.items():
        p50, p90, worst = _percentiles([t["total"] for t in timings])
        parts = ", ".join(f"{k} p50 {_percentiles([t[k] for t in timings])[0]:.1f}" for k in ("sync", "rank", "fit"))
        print(f"  {name:<10} n={len(timings):<4} p50 {p50:6.1f}  p90 {p90:6.1f}  max {worst:6.1f}   "
              f"p90/goal {p90 / GOAL_P90_MS:.2f}x   ({parts})")


if __name__ == "__main__":
    main()
