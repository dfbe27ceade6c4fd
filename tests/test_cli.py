"""The `mellum` command: every subcommand answers --help, user errors exit 2 without a traceback, pipes close quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mellum.cli import COMMANDS, main


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: mellum" in capsys.readouterr().out


@pytest.mark.parametrize("group", sorted({path.split()[0] for path in COMMANDS if " " in path}))
def test_a_group_answers_help_with_its_subcommands(group, capsys):
    """`mellum data --help` printed the top-level help and exited 2 (with "required: SUBCOMMAND" on stderr)."""
    subcommands = [path.split()[1] for path in COMMANDS if path.startswith(group + " ")]
    with pytest.raises(SystemExit) as exit_info:
        main([group, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: mellum {group}")
    assert all(name in out for name in subcommands)
    with pytest.raises(SystemExit) as exit_info:  # the subcommand is missing: said once, exit 2
        main([group])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("required: SUBCOMMAND") == 1


def test_user_error_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mellum: error:") and "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "lsp"])
@pytest.mark.parametrize("option", [["--workers", "0"], ["--prefix-cache-mb", "-1"], ["--kv-cache-mb", "0"]])
def test_servers_refuse_impossible_engine_options_before_loading(command, option, capsys):
    assert main([command, *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mellum: error: {option[0]} must be") and "loading" not in err


@pytest.mark.parametrize("argv", [["serve", "--max-body-bytes", "0"], ["serve", "--max-tokens-limit", "-1"],
                                  ["lsp", "--debounce-ms", "-5"], ["lsp", "--debounce-ms", "nan"]])
def test_server_limits_that_refuse_every_request_are_refused_up_front(argv, capsys):
    """They were accepted: a server whose every request fails with 413 (or asks for no tokens), a negative wait."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mellum: error: {argv[1]} must be") and "loading" not in err


def test_closed_pipe_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write of the child fails with EPIPE, as when `| head` has exited
    try:
        done = subprocess.run([sys.executable, "-m", "mellum.cli", "info", "mellum-4b", "--json"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 0
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
