"""Sandbox: runs untrusted code in a separate, resource-limited process with no network and a private temp dir.

Layers, outermost first (each is applied when the machine allows it; `Sandbox.isolation` says which were):

1. A separate process started through this file's launcher (`python sandbox.py SPEC`), with time, CPU, memory
   (address space), file-size, open-file and process-count limits (`resource.setrlimit`), in its own session so the
   whole group is killed on timeout.
2. Linux namespaces (`unshare(2)` through ctypes): a new network namespace (no interfaces but a down loopback: no
   network at all) and a new mount namespace where /tmp, /var/tmp and /dev/shm are fresh tmpfs mounts that vanish
   with the process, so writes outside the working directory are contained. Without root, a user namespace is
   created first (unprivileged user namespaces).
3. When started as root: the child drops to an unused uid of its own (one per running sandbox), so it cannot write
   files owned by anyone else, `RLIMIT_NPROC` counts only its own processes (fork bombs hit the limit), and every
   process it left behind is found by uid and killed.
4. For Python code, an audit hook (PEP 578) in the child denies sockets, fork/exec/subprocess, signals to other
   processes, ctypes, and writes outside the working directory, so the same guarantees hold where namespaces are
   unavailable. Denials are printed to stderr as `mellum-sandbox: denied EVENT` and reported in `Execution.denied`.

This file is also the launcher: it must import only the standard library (it runs with `python -I`).
Design after the execution guards of openai/human-eval (`reliability_guard`) and ExecEval, made OS-enforced.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DENIED_MARK = "mellum-sandbox: denied "
_SUCCESS_EXIT = 0


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run. Memory is the address-space limit (the JVM needs `java_memory_mb`)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    java_memory_mb: int = 4096  # the JVM reserves far more address space than it uses
    max_processes: int = 64  # threads count too (JVM starts ~20)
    max_file_mb: int = 64  # largest file the code may write, stdout included
    max_output_bytes: int = 1 << 20  # kept of stdout/stderr each
    max_open_files: int = 256
    tmpfs_mb: int = 256  # size of the private /tmp
    network: bool = False
    namespaces: bool = True  # try unshare(2); fall back to rlimits + audit hook if it fails
    drop_privileges: bool = True  # when root: run as a fresh unused uid

    def __post_init__(self):
        # 0 or less would not mean "no limit": every program would time out, or get the launcher's start-up slack.
        if not self.timeout_s > 0:
            raise ValueError(f"the sandbox time limit (--timeout) must be positive seconds, got {self.timeout_s}")


@dataclass
class Execution:
    """What happened: status is 'ok', 'error' (non-zero exit), 'timeout', 'memory', 'killed' (by a signal) or, from
    `Sandbox.run_tests`, 'exited' (status 0 before the tests ended)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    denied: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reason(self, limit: int = 300) -> str:
        """A short human-readable reason for a failure (last lines of stderr)."""
        if self.status == "timeout":
            return "timed out"
        if self.status == "exited":
            return "exited with status 0 before the tests ended"
        if self.denied:
            return "denied: " + ", ".join(sorted(set(self.denied)))
        tail = self.stderr.strip().splitlines()[-3:]
        text = " | ".join(tail) or f"{self.status} (exit {self.returncode})"
        return text[-limit:]


class Sandbox:
    """Runs Python source or a command in an isolated child process; safe to call from many threads at once."""

    _uid_lock = threading.Lock()
    _uid_next = 0

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self._isolation: dict | None = None

    # ---- public API ---------------------------------------------------------------------------------
    @property
    def isolation(self) -> dict:
        """Which layers are active on this machine (probed once with a tiny sandboxed run)."""
        if self._isolation is None:
            with self.workdir() as (work, uid):
                result = self._launch({"mode": "probe"}, work, uid, stdin="", config=self.config)
            try:
                self._isolation = json.loads(result.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                self._isolation = {"error": result.reason()}
        return self._isolation

    def run_python(
        self, source: str, stdin: str = "", config: SandboxConfig | None = None, files: dict[str, str] | None = None
    ) -> Execution:
        """Execute Python source as `__main__` in a fresh working directory holding `files` (name → text)."""
        with self.workdir() as (work, uid):
            for name, text in (files or {}).items():
                (work / name).write_text(text, encoding="utf-8")
            (work / "main.py").write_text(source, encoding="utf-8")
            return self._launch({"mode": "python", "file": str(work / "main.py")}, work, uid, stdin, config)

    def run_tests(self, source: str, config: SandboxConfig | None = None,
                  files: dict[str, str] | None = None) -> Execution:
        """`run_python` for a program whose last lines are its tests: ok only when it ran them *to their end*.

        An exit with status 0 is not enough: a completion that calls `sys.exit(0)` or `os._exit(0)` (or registers an
        exit hook that does) ends the program cleanly before, or after, a failing assertion — the classic hack of
        RL on unit tests, and a false pass in an evaluation. After the tests the program writes a fresh random mark
        to file descriptor 2 (not pushed out by a test flooding stdout, not hidden by swapping `sys.stderr`); a run
        that exits 0 without it has status "exited". (The mark is in the program's own source, so code that reads
        its file could still forge it; nothing short of verifying outside the process stops that.)"""
        mark = f"mellum: tests ended {secrets.token_hex(16)}"
        result = self.run_python(f"{source}\n__import__('os').write(2, {mark.encode()!r})\n", config=config,
                                 files=files)
        if result.ok:
            if mark not in result.stderr:
                result.status = "exited"
            result.stderr = result.stderr.replace(mark, "")
        return result

    def run_python_file(
        self, file: Path, work: Path, uid: int | None, stdin: str = "", config: SandboxConfig | None = None
    ) -> Execution:
        """Execute a Python file already placed in `work` (from `workdir()`), with the audit hook."""
        return self._launch({"mode": "python", "file": str(file)}, work, uid, stdin, config)

    def run_command(
        self,
        argv: list[str],
        work: Path,
        uid: int | None,
        stdin: str = "",
        config: SandboxConfig | None = None,
        java: bool = False,
    ) -> Execution:
        """Run a program (e.g. a compiled binary) inside `work` (from `workdir()`), under the same limits."""
        return self._launch({"mode": "exec", "argv": list(argv), "java": java}, work, uid, stdin, config)

    def workdir(self):
        """Context manager yielding (a fresh temporary directory, the uid that owns it or None); removed after."""
        return _Workdir(self)

    # ---- internals ----------------------------------------------------------------------------------
    def _new_uid(self) -> int | None:
        if not (self.is_root and self.config.drop_privileges):
            return None
        # A uid nobody else uses: far above system and user ranges, distinct per harness process and per run.
        with Sandbox._uid_lock:
            Sandbox._uid_next = (Sandbox._uid_next + 1) % 4096
            slot = Sandbox._uid_next
        return 1_000_000 + (os.getpid() % 200_000) * 4096 + slot

    def _launch(self, job: dict, work: Path, uid: int | None, stdin: str, config: SandboxConfig | None) -> Execution:
        cfg = config or self.config
        spec = dict(job, work=str(work), uid=uid, config=asdict(cfg))
        outdir = Path(tempfile.mkdtemp(prefix="mellum-sbx-io-"))  # parent-owned: the child only gets open fds
        try:
            (outdir / "stdin").write_text(stdin, encoding="utf-8")
            with open(outdir / "stdin", "rb") as fin, open(outdir / "out", "wb") as fout, open(outdir / "err", "wb") as ferr:
                start = time.monotonic()
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", str(Path(__file__).resolve()), json.dumps(spec)],
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=work,
                    start_new_session=True,
                    env=_child_env(),
                )
                timed_out = False
                try:
                    proc.wait(timeout=cfg.timeout_s + 0.5)  # + the launcher's own start-up
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
                    if uid is not None:
                        _kill_uid(uid)
                duration = time.monotonic() - start
            stdout = _read_capped(outdir / "out", cfg.max_output_bytes)
            stderr = _read_capped(outdir / "err", cfg.max_output_bytes)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        return _classify(proc.returncode, stdout, stderr, duration, timed_out)


class _Workdir:
    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.path: Path | None = None

    def __enter__(self) -> tuple[Path, int | None]:
        self.path = Path(tempfile.mkdtemp(prefix="mellum-sbx-"))
        uid = self.sandbox._new_uid()
        if uid is not None:
            os.chown(self.path, uid, uid)
        self.path.chmod(0o755)
        return self.path, uid

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _child_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "JAVA_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", HOME="/tmp")
    return env


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process still owned by the sandbox's uid (children that left the process group).

    A scan of /proc races with a fork bomb (new children appear behind it), so survivors are killed with
    `kill(-1, SIGKILL)` issued *as that uid* from a short-lived child: the kernel then signals every process of
    the uid in one call.
    """
    for _ in range(20):
        if not _alive_of(uid):
            return
        pid = os.fork()
        if pid == 0:  # only async-signal-safe work here: setuid, kill, _exit
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.005)


def _alive_of(uid: int) -> bool:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid != uid:
                continue
            with open(f"{entry.path}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
            continue
        if state not in (b"Z", b"X"):
            return True
    return False


def _classify(returncode: int | None, stdout: str, stderr: str, duration: float, timed_out: bool) -> Execution:
    denied = [line[len(DENIED_MARK):].strip() for line in stderr.splitlines() if line.startswith(DENIED_MARK)]
    if timed_out or returncode in (-signal.SIGXCPU,):
        status = "timeout"
    elif returncode == _SUCCESS_EXIT:
        status = "ok"
    elif "MemoryError" in stderr or "std::bad_alloc" in stderr or "OutOfMemoryError" in stderr:
        status = "memory"
    elif returncode is not None and returncode < 0:
        status = "killed"
    else:
        status = "error"
    return Execution(status, returncode, stdout, stderr, duration, denied)


# =====================================================================================================
# The launcher: everything below runs in the child, before the untrusted code.
# =====================================================================================================
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_PRIVATE = 1 << 18
_MS_REC = 16384
_MS_BIND = 4096
_MS_NOSUID = 2
_MS_NODEV = 4


def _launch_child(spec: dict) -> None:
    cfg = spec["config"]
    work = spec["work"]
    uid = spec["uid"]
    report = {"namespaces": False, "network_namespace": False, "private_tmp": False, "uid": os.getuid()}
    if cfg["namespaces"]:
        report.update(_enter_namespaces(cfg, work))
    if uid is not None and not report.get("hidden") and _hidden_ancestor(os.path.realpath(sys.base_prefix)):
        uid = None  # no private mounts: a dropped uid could not even read the Python installation
    os.chdir(work)
    _set_limits(cfg, spec, uid)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        report["uid"] = uid
    mode = spec["mode"]
    if mode == "probe":
        report["rlimit_nproc"] = _resource().getrlimit(_resource().RLIMIT_NPROC)[0]
        print(json.dumps(report))
        return
    if mode == "exec":
        os.execvp(spec["argv"][0], spec["argv"])
    _install_audit_hook(work, cfg["network"])
    _run_python_main(spec["file"])


def _resource():
    import resource

    return resource


def _set_limits(cfg: dict, spec: dict, uid: int | None) -> None:
    resource = _resource()
    memory = cfg["java_memory_mb"] if spec.get("java") else cfg["memory_mb"]

    def limit(kind, value):
        value = int(value)
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))

    limit(resource.RLIMIT_AS, memory * 2**20)
    limit(resource.RLIMIT_CPU, int(cfg["timeout_s"]) + 1)
    limit(resource.RLIMIT_FSIZE, cfg["max_file_mb"] * 2**20)
    limit(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every task of the real uid: exact with a fresh uid, an allowance over the
    # processes already running otherwise (best effort: other processes of the same user may come and go).
    existing = 0 if uid is not None else _count_tasks(os.getuid())
    limit(resource.RLIMIT_NPROC, existing + cfg["max_processes"])


def _count_tasks(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def _enter_namespaces(cfg: dict, work: str) -> dict:
    """unshare(2) network + mount namespaces; mount private tmpfs over the shared temp dirs, keep `work` visible."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNS | (0 if cfg["network"] else _CLONE_NEWNET)
    outer_uid, outer_gid = os.getuid(), os.getgid()
    if outer_uid != 0:
        flags |= _CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        return {"namespaces": False, "error": os.strerror(ctypes.get_errno())}
    if outer_uid != 0:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{outer_uid} {outer_uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{outer_gid} {outer_gid} 1")
    report = {"namespaces": True, "network_namespace": not cfg["network"], "private_tmp": False}

    def mount(source, target, fstype, mflags, data):
        return libc.mount(source, target, fstype, ctypes.c_ulong(mflags), data) == 0

    if not mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None):
        return report
    # Paths the child must still reach: its working directory and the Python installation (which may sit
    # under a private home such as /root, hidden below by an empty tmpfs for a dropped uid).
    keep = [os.path.realpath(work), os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)]
    keep_fds = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in dict.fromkeys(keep)}
    targets = [t for t in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(t)]
    targets += [h for h in dict.fromkeys(_hidden_ancestor(p) for p in keep) if h]
    covered = []
    for target in targets:
        mode = "0755" if target not in ("/tmp", "/var/tmp", "/dev/shm") else "1777"
        options = f"size={cfg['tmpfs_mb']}m,mode={mode}".encode()
        if mount(b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options):
            covered.append(target)
    # A kept path under a covered one is recreated on the tmpfs and the original bound onto it.
    for path, fd in keep_fds.items():
        if any(path == c or path.startswith(c + "/") for c in covered):
            os.makedirs(path, exist_ok=True)
            if not mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None):
                return dict(report, error=f"bind of {path} failed")
        os.close(fd)
    report["private_tmp"] = "/tmp" in covered
    report["hidden"] = [c for c in covered if c not in ("/tmp", "/var/tmp", "/dev/shm")]
    return report


def _hidden_ancestor(path: str) -> str | None:
    """The topmost ancestor of `path` that other users cannot traverse (e.g. /root), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _install_audit_hook(work: str, allow_network: bool) -> None:
    """PEP 578 audit hook: deny what the code has no business doing (a second line behind the OS layers)."""
    import os as _os
    import sys as _sys

    work_real = _os.path.realpath(work)
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_APPEND | _os.O_CREAT | _os.O_TRUNC
    always = {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.cdata",
    }
    net = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}
    path_events = {
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod",
        "os.chown", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chflags", "os.mkfifo",
        "os.mknod",
    }
    write = _sys.stderr.write

    def outside(path) -> bool:
        if isinstance(path, int):
            return False
        if isinstance(path, bytes):
            path = _os.fsdecode(path)
        real = _os.path.realpath(path)
        return not (real == work_real or real.startswith(work_real + _os.sep) or real == "/dev/null")

    def deny(event: str):
        write(f"{DENIED_MARK}{event}\n")
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event in always or (not allow_network and event in net):
            deny(event)
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and outside(path):
                deny(f"open for writing {path!r}")
        elif event in path_events:
            for arg in args:
                if isinstance(arg, (str, bytes)) and outside(arg):
                    deny(f"{event} {arg!r}")

    _sys.addaudithook(hook)


def _run_python_main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec")
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(path))
    exec(code, namespace)


if __name__ == "__main__":
    _launch_child(json.loads(sys.argv[1]))
