"""End to end on fixtures: data build → tokenizer train → data shards → PackedLoader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mellum.cli import main
from mellum.data.corpus import read_corpus
from mellum.data.samples import parse_fim
from mellum.data.shards import IGNORE_INDEX, PackedLoader, ShardSet
from mellum.prompt import get_format
from mellum.tokenizer import SPECIAL_TOKENS, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    sources = [str(FIXTURES / p) for p in ("mit_project", "apache_project", "site")]
    args = ["data", "build", "--quiet", "--workers", "1", "--out", str(root / "corpus")]
    assert main(args + [a for s in sources for a in ("--source", s)]) == 0
    assert main(["tokenizer", "train", "--quiet", "--corpus", str(root / "corpus"), "--vocab-size", "400",
                 "--held-out", "0.3", "--out", str(root / "tok")]) == 0
    return root


def test_tokenizer_train_writes_hf_files_and_report(pipeline):
    tok_dir = pipeline / "tok"
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "compression.json"}
    report = json.loads((tok_dir / "compression.json").read_text())
    tok = Tokenizer.from_pretrained(tok_dir)
    assert report["vocab_size"] == tok.vocab_size <= 400  # a tiny corpus may offer fewer merges than asked
    assert report["roundtrip_project"]["roundtrip_failures"] == 0 and report["roundtrip_project"]["files"] >= 1
    assert report["held_out"]["roundtrip_failures"] == 0
    if report["held_out"]["tokens"]:
        assert report["held_out"]["bytes_per_token"] > 1.0
    assert [tok.id_of(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_id == 0
    code = 'marker = "<fim_middle>"\n'
    assert tok.decode(tok.encode(code)) == code and not set(tok.encode(code)) & tok.special_ids
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.eos_token == "<|endoftext|>" and hf.convert_tokens_to_ids("<fim_prefix>") == tok.id_of("<fim_prefix>")
    assert hf.encode("def f(x):\n    return x\n", add_special_tokens=False) == tok.encode("def f(x):\n    return x\n")


def test_shards_with_fim_and_repo_samples_decode_to_corpus_files(pipeline):
    out = pipeline / "shards"
    assert main(["data", "shards", "--quiet", "--verify", "--corpus", str(pipeline / "corpus"), "--tokenizer",
                 os.path.relpath(pipeline / "tok"), "--out", str(out), "--fim-rate", "0.7", "--spm-rate", "0.5",
                 "--repo-samples", "0.5"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == str((pipeline / "tok").resolve())  # absolute, as the corpus (it was as typed)
    files = {r["text"] for r in read_corpus(pipeline / "corpus")}
    assert meta["num_docs"] == len(files) and meta["stats"]["verified"] == len(files)
    tok = Tokenizer.from_pretrained(pipeline / "tok")
    shards = ShardSet(out)
    fim_docs = 0
    for i in range(shards.num_docs):
        text = tok.decode(shards.document(i).tolist())
        assert text.endswith("<|endoftext|>")
        if "<fim_middle>" in text:
            order = "spm" if text.rfind("<fim_suffix>") < text.rfind("<fim_prefix>") else "psm"
            split = parse_fim(text, get_format("mellum" if order == "spm" else "mellum-psm"))
            assert split.prefix + split.middle + split.suffix in files
            fim_docs += 1
        else:
            body = text[: -len("<|endoftext|>")]
            assert body in files or any(body.endswith("\n" + f) for f in files)  # plain or repository sample
    assert fim_docs == sum(v for k, v in meta["stats"]["by_kind"].items() if "fim" in k) > 0
    loader = PackedLoader(out, seq_len=32, batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 32)
    eos_positions = batch["input_ids"] == tok.eos_id
    assert (batch["targets"][eos_positions] == IGNORE_INDEX).all()
    # Existing output is refused; --force replaces it.
    args = ["data", "shards", "--quiet", "--corpus", str(pipeline / "corpus"), "--tokenizer", str(pipeline / "tok"), "--out", str(out)]
    assert main(args) == 2
    assert main(args + ["--force", "--kind", "sft"]) == 0
    sft = ShardSet(out)
    assert sft.has_mask and json.loads((out / "meta.json").read_text())["stats"]["by_kind"].keys() == {"sft"}


def test_bad_inputs(pipeline, tmp_path, capsys):
    assert main(["data", "shards", "--corpus", str(tmp_path), "--tokenizer", str(pipeline / "tok"), "--out", str(tmp_path / "s")]) == 2
    assert "corpus directory" in capsys.readouterr().err
    assert main(["data", "shards", "--corpus", str(pipeline / "corpus"), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--corpus", str(pipeline / "corpus"), "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert "must exceed" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--corpus", str(pipeline / "corpus"), "--vocab-size", "400", "--out", str(pipeline / "tok")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "shards", "--corpus", str(pipeline / "corpus"), "--tokenizer", str(pipeline / "tok"),
                 "--fim-rate", "1.5", "--out", str(tmp_path / "s")]) == 2
    assert "--fim-rate must be between 0 and 1, got 1.5" in capsys.readouterr().err  # it named the field fim_rate
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_force_never_replaces_a_file_or_the_corpus(pipeline, tmp_path, capsys):
    corpus, tok = str(pipeline / "corpus"), str(pipeline / "tok")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    shards = ["data", "shards", "--quiet", "--force", "--corpus", corpus, "--tokenizer", tok, "--out"]
    train = ["tokenizer", "train", "--quiet", "--force", "--corpus", corpus, "--vocab-size", "300", "--out"]
    for args, message in [(shards + [str(notes)], "is not a directory"), (train + [str(notes)], "is not a directory"),
                          (shards + [corpus], "is or contains the corpus"),
                          (train + [corpus], "is or contains the corpus")]:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert notes.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert next(read_corpus(corpus))  # the corpus is still there


def test_force_replaces_only_an_earlier_output(pipeline, tmp_path, capsys):
    """`--force` with a mistyped --out naming a folder of one's own deleted that folder whole."""
    corpus, tok = str(pipeline / "corpus"), str(pipeline / "tok")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine\n")
    commands = {
        "data build": ["data", "build", "--quiet", "--force", "--source", str(FIXTURES / "mit_project"), "--out"],
        "data shards": ["data", "shards", "--quiet", "--force", "--corpus", corpus, "--tokenizer", tok, "--out"],
        "tokenizer train": ["tokenizer", "train", "--quiet", "--force", "--corpus", corpus, "--vocab-size", "300",
                            "--out"],
    }
    for name, args in commands.items():
        assert main(args + [str(precious)]) == 2, name
        assert "not an earlier output" in capsys.readouterr().err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    # An empty folder (made ahead by the user) is fine, and so is an earlier output of the same command.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(commands["tokenizer train"] + [str(empty)]) == 0
    assert main(commands["tokenizer train"] + [str(empty)]) == 0
    assert (empty / "tokenizer.json").is_file()
    # A file at --out is refused as such, with or without --force (it said "pass --force", which then refused).
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    assert main(["tokenizer", "train", "--quiet", "--corpus", corpus, "--vocab-size", "300", "--out", str(notes)]) == 2
    assert "is not a directory" in capsys.readouterr().err and notes.read_text() == "mine\n"


def test_tokenizer_train_refuses_to_check_or_train_on_nothing(pipeline, tmp_path, capsys):
    base = ["tokenizer", "train", "--quiet", "--corpus", str(pipeline / "corpus"), "--vocab-size", "300",
            "--out", str(tmp_path / "t")]
    assert main(base + ["--roundtrip-project", "no_such_project"]) == 2  # was: "0 of 0 files" round-trip, passed
    assert "is not a project of" in capsys.readouterr().err
    assert main(base + ["--languages", "cobol"]) == 2  # was: a bytes-only tokenizer trained on no text
    assert "no file of" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(base + ["--languages", "python, markdown", "--roundtrip-project", "apache_project"]) == 0
    report = json.loads((tmp_path / "t" / "compression.json").read_text())
    assert report["roundtrip_project"]["name"] == "apache_project" and report["roundtrip_project"]["files"] >= 1
