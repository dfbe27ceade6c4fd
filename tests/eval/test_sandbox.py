"""The sandbox stops or denies what untrusted completions may do, and the harness goes on afterwards."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from mellum.eval.sandbox import Sandbox, SandboxConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout_s=2.0, memory_mb=512, max_processes=16))


def _still_works(sandbox):
    result = sandbox.run_python("print(6 * 7)")
    assert result.ok and result.stdout.strip() == "42"


def test_plain_program_runs_with_stdin(sandbox):
    result = sandbox.run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n")
    assert result.ok, result.reason()
    assert result.stdout.strip() == "6"


def test_exception_is_a_failure_with_reason(sandbox):
    result = sandbox.run_python("assert 1 == 2, 'boom'")
    assert result.status == "error"
    assert "boom" in result.reason()


def test_infinite_loop_is_stopped(sandbox):
    result = sandbox.run_python("while True:\n    pass\n")
    assert result.status == "timeout"
    assert result.duration_s < 5
    _still_works(sandbox)


def test_unbounded_memory_is_stopped(sandbox):
    result = sandbox.run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n")
    assert result.status in ("memory", "killed"), result.reason()
    _still_works(sandbox)


def test_fork_is_denied_in_python(sandbox):
    result = sandbox.run_python("import os\nwhile True:\n    os.fork()\n")
    assert not result.ok
    assert "os.fork" in result.denied
    _still_works(sandbox)


def test_fork_bomb_outside_python_hooks_is_bounded(sandbox):
    # Run as a command (no audit hook): only the process limit and the group/uid kill stand in the way.
    code = "import os\nn = 0\nwhile True:\n    try:\n        os.fork(); n += 1\n    except OSError:\n        break\nprint('limited', n)\n"
    with sandbox.workdir() as (work, uid):
        result = sandbox.run_command([sys.executable, "-c", code], work, uid)
    assert "limited" in result.stdout or result.status == "timeout"
    if uid is not None:  # a fresh uid: nothing of it may survive the run
        leftover = [p for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid and _state(p) not in ("Z", "X", None)]
        assert leftover == [], [_state(p) for p in leftover]
    _still_works(sandbox)


def _state(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return None


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def test_write_outside_workdir_is_denied(sandbox, tmp_path):
    target = REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    result = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert not result.ok
    assert any("open for writing" in d for d in result.denied)
    assert not target.exists()
    # Inside the working directory writing is fine.
    assert sandbox.run_python("open('ok.txt', 'w').write('x')\nprint(open('ok.txt').read())").stdout.strip() == "x"


def test_write_outside_workdir_without_hooks_is_denied_or_contained(sandbox):
    target = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    repo_target = REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    code = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'w').write('x'); print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('denied', path, e)\n"
    )
    with sandbox.workdir() as (work, uid):
        sandbox.run_command([sys.executable, "-c", code, str(target), str(repo_target)], work, uid)
    assert not target.exists(), "a write to /tmp escaped the private tmpfs"
    iso = sandbox.isolation
    if iso.get("uid") and iso["uid"] != 0:
        assert not repo_target.exists(), "a dropped uid wrote into the repository"
    repo_target.unlink(missing_ok=True)


def test_network_socket_is_denied(sandbox):
    result = sandbox.run_python("import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\n")
    assert not result.ok
    assert "socket.__new__" in result.denied
    _still_works(sandbox)


def test_network_is_unreachable_without_hooks(sandbox):
    if not sandbox.isolation.get("network_namespace"):
        pytest.skip(f"no network namespace here: {sandbox.isolation}")
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=1); print('connected')\n"
        "except OSError as e:\n"
        "    print('no network', e)\n"
    )
    with sandbox.workdir() as (work, uid):
        result = sandbox.run_command([sys.executable, "-c", code], work, uid)
    assert "no network" in result.stdout, result.stdout + result.stderr


def test_audit_hook_alone_denies_without_os_layers(tmp_path):
    # Where namespaces and uid changes are unavailable, Python code still meets the audit hook.
    bare = Sandbox(SandboxConfig(timeout_s=2.0, namespaces=False, drop_privileges=False))
    assert bare.isolation["namespaces"] is False
    target = tmp_path / "escape.txt"
    for code, event in [
        (f"open({str(target)!r}, 'w')", "open for writing"),
        ("import socket\nsocket.socket()", "socket.__new__"),
        ("import os\nos.system('true')", "os.system"),
        ("import ctypes\nctypes.CDLL(None)", "ctypes.dlopen"),
    ]:
        result = bare.run_python(code)
        assert not result.ok and any(event in d for d in result.denied), (code, result.stderr)
    assert not target.exists()
    assert bare.run_python("print('fine')").stdout.strip() == "fine"
