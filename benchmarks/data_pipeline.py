"""Throughput of the data pipeline on real code: corpus build MB/s, tokenizer compression, shard-writing tokens/s,
packed-loader tokens/s — each next to a baseline measured in the same run (ratios, not absolute targets).

    .venv/bin/python benchmarks/data_pipeline.py                # the Python standard library (~30 MB)
    .venv/bin/python benchmarks/data_pipeline.py --full         # + this venv's and the system's site-packages
    .venv/bin/python benchmarks/data_pipeline.py --source DIR   # any sources (repeatable)

Baselines: reading + UTF-8 decoding the same files (the floor of a build), and plain `encode_batch` of the same
texts (the floor of shard writing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum.data.corpus import BuildConfig, build_corpus, read_corpus  # noqa: E402
from mellum.data.dataset import DatasetConfig, build_shards  # noqa: E402
from mellum.data.samples import SampleConfig  # noqa: E402
from mellum.data.shards import PackedLoader  # noqa: E402
from mellum.tokenizer import compression_report, train_bpe  # noqa: E402


def read_baseline(sources: list[str]) -> float:
    """MB/s of reading and UTF-8 decoding the files a build would read (no filters, secrets, dedup or writing)."""
    from mellum.data.corpus import parse_source
    from mellum.data.filters import FilterConfig, path_reason
    from mellum.data.sources import discover

    config = FilterConfig()
    started, n = time.perf_counter(), 0
    for spec in sources:
        for project in discover(parse_source(spec)[1]):
            for path, rel in project.files:
                if path_reason(rel, config):
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                data.decode("utf-8", errors="replace")
                n += len(data)
    return n / 1e6 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=None, help="source directories (default: the stdlib)")
    parser.add_argument("--full", action="store_true", help="stdlib + venv site-packages + system site-packages")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--train-mb", type=float, default=20.0, help="MB of text to train the tokenizer on")
    parser.add_argument("--shard-mb", type=float, default=20.0, help="MB of text to write shards for")
    parser.add_argument("--keep", default=None, help="keep the corpus, tokenizer and shards in this directory")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    stdlib = sysconfig.get_paths()["stdlib"]
    sources = args.source or [f"stdlib={stdlib}"]
    if args.full:
        venv_site = sysconfig.get_paths()["purelib"]
        system_site = os.path.join(stdlib, "site-packages")
        sources += [f"site={venv_site}"] + ([f"system={system_site}"] if os.path.isdir(system_site) and system_site != venv_site else [])
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mellum-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"sources": sources, "workers": args.workers}
    try:
        # 1. corpus build
        report = build_corpus(sources, work / "corpus", BuildConfig(workers=args.workers), force=True)
        t = report["totals"]
        results["build"] = {k: t[k] for k in ("projects", "projects_kept", "projects_excluded", "files_kept", "bytes_read",
                                              "bytes_kept", "exact_duplicates", "near_duplicates", "secrets_redacted",
                                              "elapsed_s", "mb_per_s")}
        floor = read_baseline(sources)
        results["build"]["read_decode_mb_per_s"] = round(floor, 1)
        print(f"build: {t['bytes_read'] / 1e6:.0f} MB in {t['elapsed_s']:.1f} s = {t['mb_per_s']:.1f} MB/s "
              f"(read+decode alone {floor:.0f} MB/s: the pipeline runs at {t['mb_per_s'] / floor:.2%} of it)")

        # 2. tokenizer: train on a budget of text, measure held-out Python (every 50th file is held out)
        records = list(read_corpus(work / "corpus"))
        held = [r for i, r in enumerate(records) if i % 50 == 0]
        train, used = [], 0
        for i, r in enumerate(records):
            if i % 50 and used < args.train_mb * 1e6:
                train.append(r["text"])
                used += len(r["text"])
        started = time.perf_counter()
        tok = train_bpe(train, args.vocab_size)
        train_s = time.perf_counter() - started
        comp = compression_report(tok, ((r["language"], r["text"]) for r in held))
        py = comp["by_language"].get("python", {})
        results["tokenizer"] = {"vocab_size": tok.vocab_size, "train_mb": round(used / 1e6, 1), "train_s": round(train_s, 1),
                                "held_out_files": comp["files"], "bytes_per_token": comp["bytes_per_token"],
                                "python_bytes_per_token": py.get("bytes_per_token"), "roundtrip_failures": comp["roundtrip_failures"]}
        print(f"tokenizer: vocab {tok.vocab_size} trained on {used / 1e6:.0f} MB in {train_s:.0f} s; held-out "
              f"{comp['files']} files: {py.get('bytes_per_token')} bytes/token on Python, "
              f"{comp['roundtrip_failures']} round-trip failures")
        tok.save(work / "tokenizer")

        # 3. shard writing vs plain encode_batch of the same texts
        sub = work / "corpus-sub"
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir()
        import zstandard

        chosen, used = [], 0
        for r in records:
            if used >= args.shard_mb * 1e6:
                break
            chosen.append(r)
            used += len(r["text"])
        with open(sub / "files.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as w:
            for r in chosen:
                w.write((json.dumps(r) + "\n").encode())
        (sub / "report.json").write_text(json.dumps({"totals": {"files_kept": len(chosen)}}))
        started = time.perf_counter()
        n_plain = sum(len(ids) for ids in tok.encode_batch([r["text"] for r in chosen]))
        plain_tps = n_plain / (time.perf_counter() - started)
        config = DatasetConfig(samples=SampleConfig(fim_rate=0.5, spm_rate=0.5, repo_rate=0.1, repo_context_chars=4000))
        stats = build_shards(sub, tok, work / "shards", config, force=True, progress=False)
        results["shards"] = {"tokens": stats["tokens"], "documents": stats["documents"], "tokens_per_s": stats["tokens_per_s"],
                             "encode_batch_tokens_per_s": round(plain_tps, 1), "by_kind": stats["by_kind"]}
        print(f"shards: {stats['tokens']:,} tokens at {stats['tokens_per_s']:,.0f} tokens/s "
              f"(plain encode_batch {plain_tps:,.0f} tokens/s: {stats['tokens_per_s'] / plain_tps:.2f}×)")

        # 4. packed loader
        loader = PackedLoader(work / "shards", seq_len=2048, batch_size=8, seed=0)
        it = iter(loader)
        started = time.perf_counter()
        n_batches = min(50, len(loader))
        for _ in range(n_batches):
            next(it)
        loader_tps = n_batches * 8 * 2048 / (time.perf_counter() - started)
        results["loader"] = {"tokens_per_s": round(loader_tps, 1), "seq_len": 2048, "batch_size": 8}
        print(f"loader: {loader_tps:,.0f} tokens/s ({loader_tps / stats['tokens_per_s']:.0f}× shard writing)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
