"""Mixture specs (the Mellum 2 preset, repetition limits) and shards written to per-source quotas."""

from __future__ import annotations

from pathlib import Path

import pytest

from mellum.data.corpus import BuildConfig, build_corpus
from mellum.data.dataset import DatasetConfig, build_shards, count_tokens
from mellum.data.mixture import MIXTURES, Mixture, Phase, get_mixture
from mellum.data.samples import SampleConfig
from mellum.data.shards import ShardSet

FIXTURES = Path(__file__).parent / "fixtures"


def test_mellum2_preset():
    m = get_mixture("mellum2")
    assert [p.fim_rate for p in m.phases] == [0.5, 0.1, 0.5] and m.max_repeat == 4.0
    shares = [p.shares() for p in m.phases]
    assert [round(s["code"], 3) for s in shares] == [round(23 / 99, 3), 0.42, 0.59]  # 70/23/6 sums to 99
    assert [p.weights for p in m.phases] == [{"web": 70, "code": 23, "math": 6}, {"web": 44, "code": 42, "math": 14},
                                             {"web": 23, "code": 59, "math": 18}]
    assert m.sources == ["code", "math", "web"] and m.code_sources == {"code"}
    assert m.phase(2).name == "phase2" and m.phase("phase3") is m.phases[2]
    with pytest.raises(ValueError, match="does not exist"):
        m.phase(4)
    with pytest.raises(ValueError, match="known: local, mellum2"):
        get_mixture("nope")
    assert set(MIXTURES) == {"mellum2", "local"}


def test_plan_enforces_max_repeat():
    m = Mixture((Phase("a", {"x": 1, "y": 3}, 0.5, 100), Phase("b", {"x": 1}, 0.5, 50)), max_repeat=2.0)
    assert m.plan({"x": 40, "y": 40}) == [{"x": 25, "y": 75}, {"x": 50}]
    assert m.repeats({"x": 40, "y": 40}) == {"x": 75 / 40, "y": 75 / 40}
    with pytest.raises(ValueError, match="'x' would be repeated 2.5×"):
        m.plan({"x": 30, "y": 40})
    with pytest.raises(ValueError, match="'y' has no tokens"):
        m.plan({"x": 100})
    with pytest.raises(ValueError, match="fim_rate"):
        Phase("bad", {"x": 1}, 1.5, 10)
    with pytest.raises(ValueError, match="weights"):
        Phase("bad", {"x": 0}, 0.5, 10)


def test_shards_follow_quotas_with_repeats_and_code_only_fim(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    build_corpus([f"lib={FIXTURES / 'mit_project'}", f"web={FIXTURES / 'apache_project'}"], corpus,
                 BuildConfig(workers=1), progress=False)
    available = count_tokens(corpus, tiny_tokenizer)
    assert set(available) == {"lib", "web"} and all(v > 0 for v in available.values())
    mixture = Mixture((Phase("p", {"lib": 1, "web": 1}, fim_rate=1.0, tokens=2 * available["web"] + 200),), max_repeat=4.0,
                      code_sources=frozenset({"lib"}))
    quotas = mixture.plan(available)[0]
    config = DatasetConfig(samples=SampleConfig(fim_rate=1.0), fim_sources=mixture.code_sources, batch_docs=1)
    stats = build_shards(corpus, tiny_tokenizer, tmp_path / "shards", config, progress=False, quotas=quotas,
                         max_repeat=mixture.max_repeat)
    # Each source is written up to its quota (one document of overshoot at most), repeating "web" to get there.
    for source, quota in quotas.items():
        assert stats["tokens_by_source"][source] >= quota or source in stats["short_sources"]
    assert stats["tokens_by_source"]["web"] > available["web"]  # repeated
    shards = ShardSet(tmp_path / "shards")
    texts = [tiny_tokenizer.decode(shards.document(i).tolist()) for i in range(shards.num_docs)]
    fim = [t for t in texts if "<fim_middle>" in t]
    plain = [t for t in texts if "<fim_middle>" not in t]
    assert fim and plain  # "lib" is FIM'd at rate 1.0, "web" (not code) never is
    assert all("greet" in t or "permissive_function" in t for t in plain)  # apache_project's files only


def test_quotas_overshoot_by_one_document_at_most_with_the_default_batching(tmp_path, tiny_tokenizer):
    # Written tokens were compared with the quota only when a batch of 64 samples was flushed, so a small quota
    # got every file of the project (many times the quota) instead of stopping at the document that reaches it.
    corpus = tmp_path / "corpus"
    build_corpus([f"lib={FIXTURES / 'mit_project'}", f"web={FIXTURES / 'apache_project'}"], corpus,
                 BuildConfig(workers=1), progress=False)
    quotas = {"lib": 40, "web": 40}
    config = DatasetConfig(samples=SampleConfig(fim_rate=0.5))
    assert config.batch_docs > 1
    stats = build_shards(corpus, tiny_tokenizer, tmp_path / "shards", config, progress=False, quotas=quotas)
    shards = ShardSet(tmp_path / "shards")
    lengths = [len(shards.document(i)) for i in range(shards.num_docs)]
    split = next(i for i in range(len(lengths) + 1) if sum(lengths[:i]) == stats["tokens_by_source"]["lib"])
    for source, docs in (("lib", lengths[:split]), ("web", lengths[split:])):
        assert docs and sum(docs) >= quotas[source] > sum(docs[:-1]), (source, docs)
