"""Mellum's own CPU decode kernels (csrc/), compiled on first use and loaded as torch ops and a torch class.

`few_rows(x, weight)` and `few_rows_int8(x, qweight, scale)` compute x [M, K] @ weight [N, K].T for the few rows
of a decode or verify step, fp32 or int8 weights with per-row scales, on every core. They read weights faster
than PyTorch's products on this kind of CPU (docs/engine.md: 20-25 GB/s against 17-18 for the split `bmm` and
12-17 for `F.linear`; int8 16-24 GB/s of int8, 1.5-2x `torch._weight_int8pack_mm`, with int16 instead of bf16
activations). `decoder.cpp` adds the fused decode forward (mellum.engine.fused).

The shared library is built once per source text, torch version and compiler flags with the system C++ compiler
(`$CXX`, else c++ / g++ / clang++) into `$MELLUM_KERNEL_DIR` (default `~/.cache/mellum/kernels`), which takes
~30 s; `./run setup` builds it ahead. Everything falls back to PyTorch's products, with the reason in `status()`,
when the CPU lacks AVX2/FMA, no compiler is found, the build fails, or `MELLUM_CPU_KERNELS=0`.

    python -c "from mellum.engine import cpu_kernels as k; raise SystemExit(k.main())"   # build, check, status
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "few_rows.cpp", CSRC / "decoder.cpp")  # one library; simd.h holds what they share
# F16C (fp16 KV caches) comes with every AVX2 CPU.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-std=c++20", "-DNDEBUG"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "status": str, once loading was tried


def kernel_dir() -> Path:
    return Path(os.environ.get("MELLUM_KERNEL_DIR") or Path.home() / ".cache" / "mellum" / "kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_supported() -> str | None:
    """None when the CPU runs the kernel, else why not."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} (the kernels are x86-64 AVX2)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability} (AVX2 and FMA needed)"
    return None


def _disabled_by_env() -> bool:
    return os.environ.get("MELLUM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def _library_path(cxx: str, flags: list[str]) -> Path:
    texts = [f.read_text() for f in sorted(CSRC.iterdir()) if f.suffix in (".cpp", ".h")]
    key = hashlib.sha256("\0".join([*texts, torch.__version__, cxx, *flags]).encode()).hexdigest()[:16]
    return kernel_dir() / f"mellum_kernels_{key}.so"


def _flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags)."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    links = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    return CFLAGS + [abi] + includes, ["-shared", "-fopenmp"] + links


def build(quiet: bool = True) -> Path:
    """Compile the library if it is not built yet; returns its path. Raises RuntimeError with the compiler's
    output when the build fails."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    compile_flags, link_flags = _flags()
    path = _library_path(cxx, compile_flags + link_flags)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"mellum: compiling the CPU decode kernels into {path} (once, ~30 s)", file=sys.stderr, flush=True)
    # Objects in a scratch directory, the sources compiled side by side; the library is linked beside the target
    # and renamed: a concurrent build or an interrupted one never leaves a broken file.
    with tempfile.TemporaryDirectory(prefix=path.stem + ".", dir=path.parent) as scratch:
        objects = [Path(scratch) / (src.stem + ".o") for src in SOURCES]
        jobs = [(src, subprocess.Popen([cxx, "-c", str(src), "-o", str(obj), *compile_flags], text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                for src, obj in zip(SOURCES, objects)]
        for src, job in jobs:
            output, _ = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed ({cxx} -c {src.name} ...):\n{output[-3000:]}")
        tmp = Path(scratch) / path.name
        done = subprocess.run([cxx, *map(str, objects), "-o", str(tmp), *link_flags], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking {path.name} failed:\n{done.stderr[-3000:]}")
        os.replace(tmp, path)
    return path


def _register_fakes() -> None:
    """Output shapes for tracing (`torch.compile` of the engine's layer loop runs the ops on fake tensors)."""
    torch.library.register_fake("mellum::few_rows")(lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake("mellum::few_rows_int8")(
        lambda x, qweight, scale: x.new_empty(x.shape[0], qweight.shape[0]))
    torch.library.register_fake("mellum::decode_attention")(lambda q, k, v, scale: q.new_empty(q.shape))


def load(quiet: bool = True) -> bool:
    """Build (if needed) and load the kernels once per process; True when `few_rows` can be used."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok, status = False, ""
        if _disabled_by_env():
            status = "disabled by MELLUM_CPU_KERNELS"
        elif (why := _cpu_supported()) is not None:
            status = f"unavailable: {why}"
        else:
            try:
                path = build(quiet)
                if not hasattr(torch.ops.mellum, "few_rows"):
                    torch.ops.load_library(str(path))
                    _register_fakes()
                ok, status = True, f"loaded {path}"
            except (RuntimeError, OSError) as exc:
                status = f"unavailable: {exc}"
                print(f"mellum: CPU decode kernels {status.splitlines()[0]}; using PyTorch's products",
                      file=sys.stderr)
        _state.update(ok=ok, status=status)
        return ok


def ready() -> bool:
    """True once `load` succeeded (cheap: the products check it on every call and never build)."""
    return _state.get("ok") is True


@contextmanager
def disabled():
    """Within the block the products take PyTorch's kernels even where Mellum's are loaded (A/B measurements)."""
    before = _state.get("ok")
    _state["ok"] = False
    try:
        yield
    finally:
        if before is None:
            _state.pop("ok", None)
        else:
            _state["ok"] = before


def status() -> str:
    """Whether the kernels are in use, and why not (after `load`)."""
    return str(_state.get("status", "not loaded yet"))


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T in fp32 (`load()` must have returned True)."""
    return torch.ops.mellum.few_rows(x.contiguous(), weight)


def few_rows_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (qweight [N, K] int8 * scale [N, 1]).T, each row of x rounded to int16 with its own scale
    (max |x| / 32767; `load()` must have returned True)."""
    return torch.ops.mellum.few_rows_int8(x.contiguous(), qweight, scale)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query token (q [B, H, 1, D]) over every cached key (k, v [B, Hkv, S, D], grouped heads):
    Mellum's kernel once loaded and the inputs fit it (fp32 CPU, each head's keys one contiguous block), else
    PyTorch's SDPA. The engine installs it on each attention layer (`Attention.decode_attention`) on CPU."""
    if (ready() and q.dtype == k.dtype == v.dtype == torch.float32 and q.device.type == "cpu"
            and k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == k.shape[-1]):
        return torch.ops.mellum.decode_attention(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def main() -> int:
    """Build (if needed) and load the kernels, check them against F.linear, print the status; the exit code is 1
    only when a supported CPU could not build or load them (`./run setup` reports it and goes on)."""
    ok = load(quiet=False)
    print(f"mellum CPU decode kernels: {status()}")
    if not ok:
        return 0 if _disabled_by_env() or _cpu_supported() is not None else 1
    x, w = torch.randn(3, 100), torch.randn(37, 100)
    err = (few_rows(x, w) - F.linear(x, w)).abs().max().item()
    print(f"check against F.linear: max |difference| {err:.2e}")
    return 0 if err < 1e-3 else 1


