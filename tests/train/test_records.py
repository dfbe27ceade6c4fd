"""The training record files (chat conversations, preference pairs, GRPO tasks, a run's metrics log): every
unreadable file is an error that names the file and line, never a bare decoder message or a traceback."""

from __future__ import annotations

import json

import pytest

from mellum.train.dpo import read_pairs
from mellum.train.metrics import read_metrics
from mellum.train.rewards import read_tasks
from mellum.train.sft import read_chat_file

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}
TASK = {"task_id": "t", "prefix": "def f():\n    return ", "test": "assert f() == 1"}
READERS = [(read_chat_file, CHAT), (read_pairs, PAIR), (read_tasks, TASK)]


@pytest.mark.parametrize("read, record", READERS, ids=["chat", "pairs", "tasks"])
def test_text_that_is_not_utf8_names_file_and_line(tmp_path, read, record):
    """`printf '\\xff\\xfe' > bad.jsonl` (a UTF-16 byte-order mark) was "'utf-8' codec can't decode byte 0xff in
    position 0" with no file named."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not UTF-8 text \(byte 0xff at column 1\)"):
        read(path)
    path.write_bytes((json.dumps(record) + "\n").encode() + b'{"x": "caf\xe9"}\n')  # Latin-1 on line 2
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11\)"):
        read(path)


@pytest.mark.parametrize("read, record", READERS, ids=["chat", "pairs", "tasks"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, read, record):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n").encode())  # UTF-8 as Windows editors save it
    assert len(read(path)) == 1


@pytest.mark.parametrize("read", [read_pairs, read_tasks], ids=["pairs", "tasks"])
def test_a_line_that_is_not_an_object_is_named(tmp_path, read):
    """A JSON array or string on a line was an AttributeError traceback ("'list' object has no attribute 'get'")."""
    path = tmp_path / "records.jsonl"
    for line in ("[1, 2]", '"text"'):
        path.write_text(json.dumps(PAIR if read is read_pairs else TASK) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=r"records\.jsonl:2: expected a JSON object"):
            read(path)


def test_chat_errors_name_file_and_line_and_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: message 0 has unknown role 'robot'"):
        read_chat_file(path)
    path.write_text("\n\n")  # was an empty list: the file silently added nothing to the run
    with pytest.raises(ValueError, match=r"chat\.jsonl holds no conversations"):
        read_chat_file(path)


def test_sft_command_names_a_file_that_is_not_utf8_and_leaves_no_run(tiny_model_dir, tmp_path, capsys):
    from mellum.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe")
    out = tmp_path / "run"
    assert main(["train", "sft", "--model", str(tiny_model_dir), "--chat", str(bad), "--out", str(out),
                 "--no-bar"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: not UTF-8 text" in err and "codec" not in err and not out.exists()


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_other_bad_lines_are_named(tmp_path):
    """A run killed while writing a line left it half written: resuming it failed on "Unterminated string"
    with no file named."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not a metrics record"):
        read_metrics(path)
