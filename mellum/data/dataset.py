"""A tokenized dataset: corpus records → samples (plain, FIM, repository-level or SFT) → token shards.

Repository-level samples need all files of a project together, and a corpus need not list a project's files
contiguously (a split or subsampled corpus may be in any order), so the selected records are grouped by project
in memory (the text of the corpus: fine up to a few GB). Each project gets its own RNG seeded from the run seed
and the project name, so a sample does not depend on which other projects were selected.
"""

from __future__ import annotations

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
    for r in records:
        if config.kind == "sft":
            sample = builder.sft(r["path"], r["text"], r["language"], rng, files, repo)
            if sample is None:
                continue
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
) -> dict:
    """Write token shards for a corpus; returns statistics (documents by kind, tokens, tokens/s)."""
    from tqdm import tqdm

    config = config or DatasetConfig()
    builder = SampleBuilder(config.samples)
    encoder = SegmentEncoder(tokenizer)
    encoder.check_format(builder.spm)
    encoder.check_format(builder.psm)
    from mellum.data.corpus import read_report

    total_files = read_report(corpus)["totals"]["files_kept"]
    kinds: Counter = Counter()
    verified = 0
    started = time.perf_counter()
    meta = {
        "corpus": str(Path(corpus).resolve()),
        "tokenizer": tokenizer_name,
        "dataset": _config_dict(config),
    }
    writer = ShardWriter(out, tokenizer.vocab_size, tokenizer.eos_id, force=force,
                         config=ShardWriterConfig(shard_tokens=config.shard_tokens), extra_meta=meta)
    bar = tqdm(total=total_files, unit="file", desc="data shards", disable=not progress, smoothing=0.1)
    with writer:
        pending: list[Sample] = []

        def flush() -> None:
            nonlocal verified
            for sample, (ids, mask) in zip(pending, encode_samples(encoder, pending)):
                if config.verify:
                    _verify(tokenizer, sample, ids)
                    verified += 1
                writer.add(ids, mask if config.kind == "sft" else None)
                kinds[sample.kind] += 1
            pending.clear()

        for project, records in _projects(corpus, config):
            for sample, record in _samples(project, records, builder, config):
                if sample.fim is not None and sample.fim.text != record["text"]:
                    raise AssertionError(f"FIM split of {record['path']} does not rebuild the file")
                pending.append(sample)
                if len(pending) >= config.batch_docs:
                    flush()
            bar.update(len(records))
            bar.set_postfix_str(f"{writer.num_tokens / max(1e-9, time.perf_counter() - started):,.0f} tok/s")
        flush()
        if writer.num_docs == 0:
            raise ValueError(f"no documents to write from {corpus} (check --source / --languages filters)")
        elapsed = time.perf_counter() - started
        stats = {
            "documents": writer.num_docs,
            "tokens": writer.num_tokens,
            "by_kind": dict(kinds.most_common()),
            "verified": verified,
            "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(writer.num_tokens / max(elapsed, 1e-9), 1),
        }
        writer.extra_meta["stats"] = stats
    bar.close()
    return stats


def _verify(tokenizer, sample: Sample, ids: list[int]) -> None:
    text = "".join(s for _, s in sample.segments)
    if tokenizer.decode(ids) != text:
        raise AssertionError(f"a {sample.kind} sample does not decode back to its text")


def _config_dict(config: DatasetConfig) -> dict:
    data = asdict(config)
    for key in ("sources", "languages"):
        data[key] = sorted(data[key]) if data[key] is not None else None
    return data
