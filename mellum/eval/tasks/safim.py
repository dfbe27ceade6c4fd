"""SAFIM (Gong et al. 2024, "Evaluation of LLMs on Syntax-Aware Code Fill-in-the-Middle Tasks").

block / control: the completed program is compiled (C++, Java) or run (Python) on the stdin/stdout unit tests;
a language whose toolchain is missing here (C# without `mcs`/`dotnet`, or g++/javac absent) is reported skipped.
api: scored by syntax-aware match — the completion and the ground truth are equal after removing all whitespace
outside string literals (the completion is first cut at its balanced call, as SAFIM's `truncate_api_call` does).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from mellum.eval.tasks import Benchmark, Problem, Score, literal, read_jsonl

HOLE = "{{completion}}"
EXTENSIONS = {"python": "py", "cpp": "cpp", "java": "java", "csharp": "cs"}


class Safim(Benchmark):
    name = "safim"
    splits = ("block", "control", "api")
    compile_timeout_s = 60.0
    run_timeout_s = 20.0  # per unit test; generous for Python on a loaded machine
    result_settings = ("run_timeout_s",)

    def __init__(self, data_dir, split=None):
        super().__init__(data_dir, split)
        self.scoring = "match" if self.split == "api" else "execution"
        self.max_new_tokens = {"block": 256, "control": 48, "api": 64}[self.split]
        self.multiline = True if self.split == "block" else False

    def load(self) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "safim" / f"{self.split}_completion.jsonl.gz")
        problems = []
        for row in rows:
            text = row["eval_prompt"]
            if text.count(HOLE) != 1:
                raise ValueError(f"{row['task_id']}: expected one {HOLE} in eval_prompt")
            prefix, suffix = text.split(HOLE)
            lang = row["lang"]
            problems.append(
                Problem(
                    task_id=row["task_id"],
                    prefix=prefix,
                    suffix=suffix,
                    reference=row["ground_truth"],
                    path=f"{_java_class(text) or 'main'}.{EXTENSIONS.get(lang, 'txt')}",
                    language=lang,
                    meta={"unit_tests": literal(row["unit_tests"])},
                )
            )
        return problems

    def postprocess(self, problem: Problem, completion: str) -> str:
        if self.split == "api":
            return truncate_call(completion)
        if self.split == "control":
            return completion.split("\n", 1)[0]
        return truncate_block(completion, problem.language, problem.prefix)

    def score(self, problem: Problem, completion: str, sandbox) -> Score:
        if self.split == "api":
            same = normalize_code(completion) == normalize_code(problem.reference)
            return Score(passed=same, metrics={"exact_match": float(same)})
        toolchain = TOOLCHAINS.get(problem.language)
        missing = toolchain.missing() if toolchain else f"no runner for {problem.language}"
        if missing:
            return Score(passed=False, reason=f"skipped: {missing}", skipped=True)
        source = problem.prefix + completion + problem.suffix
        return toolchain.run_tests(source, problem, sandbox, self)


def truncate_call(text: str) -> str:
    """Cut at the parenthesis that closes the first call (SAFIM api completions are one call expression)."""
    depth, opened = 0, False
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
            opened = True
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                return text[:index]
            if depth == 0 and opened and char == ")":
                return text[: index + 1]
        elif char in ";\n" and depth == 0:
            return text[:index]
    return text


def truncate_block(text: str, language: str, prefix: str = "") -> str:
    """Cut a block completion where its block ends: a dedent below the cursor line's indentation (Python) or an
    unmatched closing brace (C-like), following the idea of SAFIM's `truncate_line_until_block`."""
    lines = text.split("\n")
    if language == "python":
        cursor_line = prefix.rsplit("\n", 1)[-1]
        if cursor_line.strip():  # the hole starts mid-line: its block is indented like that line
            indent = len(cursor_line) - len(cursor_line.lstrip())
        else:
            indent = len(cursor_line)
        for index, line in enumerate(lines[1:], 1):
            if line.strip() and len(line) - len(line.lstrip()) < indent:
                return "\n".join(lines[:index]).rstrip("\n")
        return text
    depth = 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return text[:index].rstrip()
    return text


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')


def normalize_code(code: str) -> str:
    """Remove whitespace outside string literals (a light syntax-aware normal form for api matching)."""
    out, last = [], 0
    for match in _STRING.finditer(code):
        out.append(re.sub(r"\s+", "", code[last : match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(re.sub(r"\s+", "", code[last:]))
    return "".join(out)


def outputs_match(got: str, expected: list[str] | str) -> bool:
    """Whitespace-insensitive token comparison; integers exactly, real numbers within 1e-6 relative/absolute
    (checker-style: testlib compares integer answers exactly, so 1000001 is not 1000000)."""
    candidates = expected if isinstance(expected, list) else [expected]
    have = got.split()
    return any(_tokens_equal(have, str(e).split()) for e in candidates)


_YES_NO = {"yes", "no"}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_REAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # not nan, inf or 1_000


def _tokens_equal(a: list[str], b: list[str]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if x.lower() == y.lower() and y.lower() in _YES_NO:
            continue  # Codeforces accepts YES/NO answers in any letter case
        if _INTEGER.fullmatch(x) and _INTEGER.fullmatch(y):
            if int(x) != int(y):
                return False
            continue
        if not (_REAL.fullmatch(x) and _REAL.fullmatch(y)):
            return False
        fx, fy = float(x), float(y)
        if abs(fx - fy) > 1e-6 * max(1.0, abs(fy)):
            return False
    return True


def _java_class(text: str) -> str | None:
    match = re.search(r"public\s+(?:final\s+)?class\s+(\w+)", text)
    return match.group(1) if match else None


class _Toolchain:
    """Compile (if needed) inside the sandbox, then run every unit test; stop at the first failure."""

    tools: tuple[str, ...] = ()

    def missing(self) -> str:
        absent = [t for t in self.tools if shutil.which(t) is None]
        return f"{', '.join(absent)} not installed" if absent else ""

    def run_tests(self, source: str, problem: Problem, sandbox, bench: Safim) -> Score:
        run_cfg = replace(sandbox.config, timeout_s=bench.run_timeout_s)
        with sandbox.workdir() as (work, uid):
            runner = self.prepare(source, problem, work, uid, sandbox, bench)
            if isinstance(runner, Score):
                return runner
            for index, test in enumerate(problem.meta["unit_tests"]):
                result = runner(test["input"], run_cfg)
                if not result.ok:
                    return Score(passed=False, reason=f"test {index}: {result.reason()}")
                if not outputs_match(result.stdout, test["output"]):
                    return Score(passed=False, reason=f"test {index}: wrong answer {result.stdout[:60]!r}")
        return Score(passed=True)

    def prepare(self, source, problem, work: Path, uid, sandbox, bench):
        """Write (and compile) the program; return `run(stdin, config) -> Execution`, or a failing Score."""
        raise NotImplementedError


class _Python(_Toolchain):
    def prepare(self, source, problem, work, uid, sandbox, bench):
        (work / "main.py").write_text(source, encoding="utf-8")
        return lambda stdin, cfg: sandbox.run_python_file(work / "main.py", work, uid, stdin, cfg)


class _Cpp(_Toolchain):
    tools = ("g++",)
    flags = ("-std=gnu++17", "-O2", "-DONLINE_JUDGE")  # as Codeforces compiles: `#ifndef ONLINE_JUDGE` opens files
    _pch_lock = threading.Lock()
    _pch: Path | None | bool = False  # False: not built yet; None: unavailable

    def prepare(self, source, problem, work, uid, sandbox, bench):
        (work / "main.cpp").write_text(source, encoding="utf-8")
        cfg = replace(sandbox.config, timeout_s=bench.compile_timeout_s, memory_mb=4096)
        include = self._link_pch(work) if uid is not None and "bits/stdc++.h" in source else []
        argv = ["g++", *self.flags, *include, "-o", "main", "main.cpp"]
        result = sandbox.run_command(argv, work, uid, config=cfg)
        if not result.ok:
            return Score(passed=False, reason=f"compile error: {result.reason()}")
        return lambda stdin, cfg: sandbox.run_command([str(work / "main")], work, uid, stdin, cfg)


    def _link_pch(self, work: Path) -> list[str]:
        """Most Codeforces C++ includes <bits/stdc++.h>; a precompiled header (built once, same flags) makes each
        compile ~4x faster. It is hard-linked into the working directory, read-only for the sandbox's uid."""
        with _Cpp._pch_lock:
            if _Cpp._pch is False:
                _Cpp._pch = _build_pch(self.flags)
        if _Cpp._pch is None:
            return []
        target = work / "pch" / "bits"
        target.mkdir(parents=True)
        try:
            os.link(_Cpp._pch, target / "stdc++.h.gch")
        except OSError:
            return []
        (work / "pch").chmod(0o755)
        target.chmod(0o755)
        return ["-I", str(work / "pch")]


def _build_pch(flags: tuple[str, ...]) -> Path | None:
    """Precompile bits/stdc++.h for `flags` into a shared temp cache (trusted: a system header, no task code)."""
    try:
        header = subprocess.run(["g++", *flags, "-x", "c++", "-E", "-H", "-"], input="#include <bits/stdc++.h>\n",
                                capture_output=True, text=True, timeout=120)
        path = next(l.split(" ", 1)[1] for l in header.stderr.splitlines() if l.startswith(". ") and "stdc++.h" in l)
        version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256((version + " ".join(flags) + path).encode()).hexdigest()[:12]
        cache = Path(tempfile.gettempdir()) / f"mellum-pch-{key}"
        gch = cache / "stdc++.h.gch"
        if not gch.is_file():
            cache.mkdir(mode=0o755, exist_ok=True)
            tmp = cache / f".stdc++.h.gch.{os.getpid()}"
            subprocess.run(["g++", *flags, "-x", "c++-header", path, "-o", str(tmp)], check=True, timeout=300,
                           capture_output=True)
            tmp.chmod(0o644)
            os.replace(tmp, gch)
        return gch
    except (OSError, subprocess.SubprocessError, StopIteration):
        return None


class _Java(_Toolchain):
    tools = ("javac", "java")
    flags = ("-Xss64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData",
             "-DONLINE_JUDGE=true")

    def prepare(self, source, problem, work, uid, sandbox, bench):
        name = _java_class(source) or "Main"
        (work / f"{name}.java").write_text(source, encoding="utf-8")
        cfg = replace(sandbox.config, timeout_s=bench.compile_timeout_s)
        compile_cmd = ["javac", "-J-XX:+UseSerialGC", "-J-XX:TieredStopAtLevel=1", "-J-Xmx512m", "-nowarn"]
        result = sandbox.run_command(compile_cmd + ["-d", ".", f"{name}.java"], work, uid, config=cfg, java=True)
        if not result.ok:
            return Score(passed=False, reason=f"compile error: {result.reason()}")
        argv = ["java", *self.flags, "-cp", str(work), _java_class(source) or _java_main_class(source) or "Main"]
        return lambda stdin, cfg: sandbox.run_command(argv, work, uid, stdin, cfg, java=True)


def _java_main_class(source: str) -> str | None:
    """The class that declares `main`, for files without a public class."""
    index = source.find("static void main")
    if index == -1:
        return None
    classes = list(re.finditer(r"\bclass\s+(\w+)", source[:index]))
    return classes[-1].group(1) if classes else None


TOOLCHAINS: dict[str, _Toolchain] = {"python": _Python(), "cpp": _Cpp(), "java": _Java()}
