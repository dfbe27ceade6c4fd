"""A tokenized dataset: corpus records → samples (plain, FIM, repository-level or SFT) → token shards.

Repository-level samples need all files of a project together, and a corpus need not list a project's files
contiguously (a split or subsampled corpus may be in any order), so the selected records are grouped by project
in memory (the text of the corpus: fine up to a few GB). Each project gets its own RNG seeded from the run seed
and the project name, so a sample does not depend on which other projects were selected.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from mellum.data.corpus import read_corpus
from mellum.data.samples import Sample, SampleBuilder, SampleConfig, SegmentEncoder, encode_samples
from mellum.data.shards import ShardWriter, ShardWriterConfig


@dataclass
class DatasetConfig:
    kind: str = "pretrain"  # "pretrain" (loss on every token) | "sft" (loss on the middle only)
    samples: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    sources: frozenset[str] | None = None  # corpus source labels to include (None: all)
    languages: frozenset[str] | None = None  # languages to include (None: all)
    fim_sources: frozenset[str] | None = None  # FIM only on these source labels (None: all; Mellum 2: code only)
    batch_docs: int = 64  # samples tokenized per encode_batch call
    verify: bool = False  # decode every sample and check it equals its text, and prefix + middle + suffix == file
    shard_tokens: int = 1 << 28

    def __post_init__(self):
        if self.kind not in ("pretrain", "sft"):
            raise ValueError(f"kind must be 'pretrain' or 'sft', got {self.kind!r}")


def _project_seed(seed: int, project: str) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(project.encode("utf-8"), seed=seed)


def _projects(corpus: str | os.PathLike, config: DatasetConfig) -> Iterator[tuple[str, list[dict]]]:
    records = (
        r for r in read_corpus(corpus)
        if (config.sources is None or r.get("source") in config.sources)
        and (config.languages is None or r.get("language") in config.languages)
    )
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["project"], []).append(r)
    yield from groups.items()


def _samples(project: str, records: list[dict], builder: SampleBuilder, config: DatasetConfig) -> Iterator[tuple[Sample, dict]]:
    rng = np.random.default_rng(_project_seed(config.seed, project))
    files = [(r["path"], r["text"]) for r in records]
    repo = project.split("#")[0]
    plain = None
    for r in records:
        if config.kind == "sft":
            sample = builder.sft(r["path"], r["text"], r["language"], rng, files, repo)
            if sample is None:
                continue
        elif config.fim_sources is not None and r.get("source", "code") not in config.fim_sources:
            if plain is None:
                plain = SampleBuilder(dataclasses.replace(builder.config, fim_rate=0.0))
            sample = plain.pretrain(r["path"], r["text"], rng, files, repo)
        else:
            sample = builder.pretrain(r["path"], r["text"], rng, files, repo)
        yield sample, r


def build_shards(
    corpus: str | os.PathLike,
    tokenizer,
    out: str | os.PathLike,
    config: DatasetConfig | None = None,
    force: bool = False,
    progress: bool = True,
    tokenizer_name: str = "",
    quotas: dict[str, int] | None = None,
    max_repeat: float = 1.0,
) -> dict:
    """Write token shards for a corpus; returns statistics (documents by kind, tokens per source, tokens/s).

    Without `quotas` every selected file becomes one document. With `quotas` (tokens per source label, from
    `Mixture.plan`), each source is read until its quota is written, repeating it (with fresh FIM draws) at most
    `ceil(max_repeat)` times; a source that runs out early is reported in the statistics as short.
    """
    from tqdm import tqdm

    from mellum.data.corpus import read_report
    from mellum.data.outputs import refuse_inside

    config = config or DatasetConfig()
    refuse_inside(out, corpus, "corpus")
    builder = SampleBuilder(config.samples)
    encoder = SegmentEncoder(tokenizer)
    encoder.check_format(builder.spm)
    encoder.check_format(builder.psm)
    total_files = read_report(corpus)["totals"]["files_kept"]
    kinds: Counter = Counter()
    per_source: Counter = Counter()
    verified = 0
    started = time.perf_counter()
    meta = {"corpus": str(Path(corpus).resolve()), "tokenizer": tokenizer_name, "dataset": _config_dict(config),
            "quotas": quotas}
    writer = ShardWriter(out, tokenizer.vocab_size, tokenizer.eos_id, force=force,
                         config=ShardWriterConfig(shard_tokens=config.shard_tokens), extra_meta=meta)
    bar = tqdm(total=sum(quotas.values()) if quotas else total_files, unit="tok" if quotas else "file",
               unit_scale=bool(quotas), desc="data shards", disable=not progress, smoothing=0.1)
    with writer:
        pending: list[tuple[Sample, str]] = []
        # With quotas: an upper bound on the tokens of the pending samples (their UTF-8 bytes; a byte-level BPE never
        # spends more than one token per byte), so the quota check knows when it must write before it adds more.
        pending_bound = [0]

        def flush() -> None:
            nonlocal verified
            encoded = encode_samples(encoder, [sample for sample, _ in pending])
            for (sample, source), (ids, mask) in zip(pending, encoded):
                if config.verify:
                    _verify(tokenizer, sample, ids)
                    verified += 1
                before = writer.num_tokens
                writer.add(ids, mask if config.kind == "sft" else None)
                kinds[sample.kind] += 1
                per_source[source] += writer.num_tokens - before
                if quotas:
                    bar.update(writer.num_tokens - before)
            pending.clear()
            pending_bound[0] = 0
            bar.set_postfix_str(f"{writer.num_tokens / max(1e-9, time.perf_counter() - started):,.0f} tok/s")

        def add(sample: Sample, record: dict) -> None:
            if sample.fim is not None and sample.fim.text != record["text"]:
                raise AssertionError(f"FIM split of {record['path']} does not rebuild the file")
            pending.append((sample, record.get("source", "code")))
            if quotas:
                pending_bound[0] += sum(len(s.encode("utf-8")) for _, s in sample.segments)
            if len(pending) >= config.batch_docs:
                flush()

        short: dict[str, int] = {}
        if quotas is None:
            for project, records in _projects(corpus, config):
                for sample, record in _samples(project, records, builder, config):
                    add(sample, record)
                bar.update(len(records))
        else:
            short = _fill_quotas(corpus, config, builder, quotas, max_repeat, add, flush, per_source,
                                 lambda: pending_bound[0])
        flush()
        if writer.num_docs == 0:
            raise ValueError(f"no documents to write from {corpus} (check --source / --languages filters)")
        elapsed = time.perf_counter() - started
        stats = {
            "documents": writer.num_docs,
            "tokens": writer.num_tokens,
            "by_kind": dict(kinds.most_common()),
            "tokens_by_source": dict(per_source.most_common()),
            "verified": verified,
            "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(writer.num_tokens / max(elapsed, 1e-9), 1),
        }
        if quotas is not None:
            stats["short_sources"] = short
        writer.extra_meta["stats"] = stats
    bar.close()
    return stats


def _fill_quotas(corpus, config: DatasetConfig, builder: SampleBuilder, quotas: dict[str, int], max_repeat: float,
                 add, flush, per_source: Counter, pending_bound) -> dict[str, int]:
    """Stream each source, repeated up to ceil(max_repeat) times, until its quota is written; → unmet tokens.

    `per_source` counts written tokens only, so samples are written as soon as the pending ones might reach the
    quota: checking it only at batch boundaries overshot by up to `batch_docs - 1` documents (64 by default — many
    times a small quota).
    """
    import math

    short = {}
    for source in sorted(quotas):
        quota = quotas[source]
        if quota <= 0:
            continue
        sub = dataclasses.replace(config, sources=frozenset({source}))
        for epoch in range(max(1, math.ceil(max_repeat))):
            sub = dataclasses.replace(sub, seed=config.seed + 1_000_003 * epoch)  # fresh FIM draws per repeat
            before = per_source[source]
            for project, records in _projects(corpus, sub):
                for sample, record in _samples(project, records, builder, sub):
                    add(sample, record)
                    if per_source[source] + pending_bound() >= quota:
                        flush()
                    if per_source[source] >= quota:
                        break
                flush()
                if per_source[source] >= quota:
                    break
            if per_source[source] >= quota or per_source[source] == before:
                break
        if per_source[source] < quota:
            short[source] = quota - per_source[source]
    return short


def count_tokens(corpus: str | os.PathLike, tokenizer, sample_bytes: int = 2_000_000) -> dict[str, int]:
    """Estimated tokens per source label: its bytes divided by bytes/token measured on its first files."""
    sizes: Counter = Counter()
    probe: dict[str, list[str]] = {}
    for record in read_corpus(corpus):
        source = record.get("source", "code")
        sizes[source] += len(record["text"].encode("utf-8"))
        texts = probe.setdefault(source, [])
        if sum(map(len, texts)) < sample_bytes:
            texts.append(record["text"])
    out = {}
    for source, texts in probe.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts)) or 1
        out[source] = int(sizes[source] * n_tokens / n_bytes)
    return out


def _verify(tokenizer, sample: Sample, ids: list[int]) -> None:
    text = "".join(s for _, s in sample.segments)
    if tokenizer.decode(ids) != text:
        raise AssertionError(f"a {sample.kind} sample does not decode back to its text")


def _config_dict(config: DatasetConfig) -> dict:
    data = asdict(config)
    for key in ("sources", "languages", "fim_sources"):
        data[key] = sorted(data[key]) if data[key] is not None else None
    return data
