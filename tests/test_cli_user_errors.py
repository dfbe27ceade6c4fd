"""The mistakes a new user makes with the `mellum` command, each answered by one line before anything slow starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mellum.cli import main

FIXTURES = Path(__file__).parent / "data" / "fixtures"


@pytest.fixture
def busy_port():
    """A loopback port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == "mellum 0.1.0"


def test_serve_on_a_busy_port_says_so_before_loading(busy_port, capsys):
    """The model loaded first, the banner claimed "serving ... on" the port, and then uvicorn failed to bind."""
    assert main(["serve", "--port", str(busy_port), "--no-telemetry"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mellum: error: cannot listen on 127.0.0.1:{busy_port}") and "loading" not in err


@pytest.mark.parametrize("where", ["busy", "127.0.0.1:99999"])
def test_lsp_over_tcp_refuses_an_address_it_cannot_listen_on(where, busy_port, capsys):
    """After loading the model, a busy port was an OSError traceback and port 99999 an OverflowError traceback."""
    address = f"127.0.0.1:{busy_port}" if where == "busy" else where
    assert main(["lsp", "--tcp", address, "--no-telemetry"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mellum: error: cannot listen on {address}") and err.count("\n") == 1


def test_lsp_log_file_that_cannot_be_written_names_the_option(tmp_path, capsys):
    assert main(["lsp", "--log-file", str(tmp_path / "missing" / "lsp.log"), "--no-telemetry"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mellum: error: cannot write --log-file") and err.count("\n") == 1


def test_complete_file_that_is_a_directory(tmp_path, capsys):
    """It said "no file DIR", as if the path did not exist."""
    assert main(["complete", "--file", str(tmp_path), "--line", "1", "--column", "1"]) == 2
    assert capsys.readouterr().err == f"mellum: error: --file {tmp_path} is a directory; give the file to complete in\n"


def test_complete_note_on_a_cut_prompt_is_true_and_says_how_to_look(tiny_model_dir, tmp_path, capsys):
    """The note said the prompt "did not fit the model's window" whenever the packer cut the file, which it does to
    any suffix longer than its share of the budget, even in a file that fits whole (the README's first example)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "util.py").write_text("".join(f"def helper_{i}(x):\n    return x + {i}\n\n" for i in range(30)))
    short = project / "short.py"
    short.write_text("".join(f"value_{i} = {i}\n" for i in range(40)))  # fits the window; its suffix exceeds 15%
    args = ["complete", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--project", str(project)]
    assert main(args + ["--file", str(short), "--line", "5", "--column", "1", "--json", "--show-prompt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "value_39 = 39" not in out["prompt"] and not out["truncated"]  # trimmed by the shares, not the window
    assert main(args + ["--file", str(short), "--line", "5", "--column", "1"]) == 0
    assert "note" not in capsys.readouterr().err
    long = project / "long.py"
    long.write_text("".join(f"value_{i} = {i}\n" for i in range(400)))  # far more than the 512-token window
    assert main(args + ["--file", str(long), "--line", "200", "--column", "1"]) == 0
    err = capsys.readouterr().err
    assert "mellum: note: the file does not fit the model's 512-token window" in err and "--show-prompt" in err


def test_info_counts_small_models_in_millions_or_thousands(capsys):
    """A 205,120-parameter model was "(0.00B)"."""
    assert main(["info", "tiny-dense"]) == 0
    assert "205,120 total (205.1K)" in capsys.readouterr().out
    assert main(["info", "mellum-4b"]) == 0
    assert "(4.02B)" in capsys.readouterr().out


def test_tokenizer_train_prints_only_its_summary_on_stdout(tmp_path, capfd):
    """Without --quiet the tokenizers library's progress left blank lines on stdout before the summary."""
    corpus, out = tmp_path / "corpus", tmp_path / "tok"
    assert main(["data", "build", "--quiet", "--workers", "1", "--source", str(FIXTURES / "mit_project"),
                 "--out", str(corpus)]) == 0
    capfd.readouterr()
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{out}: vocab ")


def test_pretrain_without_a_tokenizer_warns_before_training(tmp_path, capsys):
    """The run exported a model with no tokenizer.json, which `mellum complete` then refused, and said nothing."""
    argv = ["train", "pretrain", "--recipe", "tiny-cpu", "--data", str(tmp_path / "no-shards"),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv) == 2  # the missing shards stop it before any training
    assert "mellum: note: no tokenizer (--tokenizer DIR" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer" not in capsys.readouterr().err
    assert main([*argv, "--no-export"]) == 2
    assert "no tokenizer" not in capsys.readouterr().err


def test_a_fine_tuning_run_that_cannot_start_leaves_no_run_directory(tiny_model_dir, tmp_path, capsys):
    """A bad data file was found after `--out` had been made: an empty run directory stayed behind."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("not json\n")
    out = tmp_path / "runs" / "sft"
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--chat", str(chat), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"mellum: error: {chat}:1: not valid JSON")
    assert not out.exists()
