"""Mellum's CPU decode kernels (csrc/few_rows.cpp): products against float64 references, their input checks, the
engine's use of them, and the fallback to PyTorch's products when they cannot be built."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mellum.engine import NativeEngine, SamplingParams, cpu_kernels
from mellum.engine.kernels import SplitLinear, SplitSwitch
from mellum.engine.quant import Int8Experts, Int8Linear
from mellum.model.moe import Experts
from tests.engine.helpers import reference_greedy, tiny_model

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(cpu_kernels._cpu_supported() is not None,
                                reason=f"{cpu_kernels._cpu_supported()}: the kernels are x86-64 AVX2")


@pytest.fixture(scope="module")
def kernels():
    # `./run setup` installs a C++ compiler and builds them: on a supported CPU they must load.
    assert cpu_kernels.load(), cpu_kernels.status()
    return cpu_kernels


# Shapes with row and feature counts off the kernel's blocks (4 weight rows, 8 features) and inside them.
SHAPES = [(1, 3, 5), (2, 7, 9), (1, 64, 640), (3, 129, 200), (5, 1024, 640), (16, 37, 1720), (4, 4, 8)]


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
def test_few_rows_equals_a_float64_product(kernels, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    x, w = torch.randn(rows, in_features, generator=g), torch.randn(out_features, in_features, generator=g)
    want = (x.double() @ w.double().T).float()
    got = kernels.few_rows(x, w)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * in_features ** 0.5)


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
def test_few_rows_int8_equals_the_dequantized_product(kernels, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows + out_features)
    x = torch.randn(rows, in_features, generator=g)
    q = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, generator=g) / 100
    w = q.double() * scale.double()[:, None]
    got = kernels.few_rows_int8(x, q, scale)
    # The kernel rounds each activation row to int16 with the scale max|x| / 32767 (csrc/simd.h): exact against
    # that rounding, and within half a step per feature of the unrounded product.
    step = x.abs().amax(dim=1, keepdim=True) / 32767
    rounded = torch.round(x * (1 / step)).double() * step.double()
    torch.testing.assert_close(got, (rounded @ w.T).float(), rtol=1e-5, atol=1e-4)
    bound = (step.double() / 2) @ w.abs().sum(dim=1)[None] + 1e-5  # [M, N]
    assert ((got.double() - x.double() @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("batch,heads,kv_heads,keys,head_dim", [(1, 10, 10, 951, 64), (2, 8, 2, 37, 64),
                                                                (1, 4, 4, 1, 12), (3, 6, 3, 200, 20),
                                                                (1, 3, 1, 17, 128), (1, 2, 2, 100, 72)])
def test_decode_attention_equals_sdpa_over_cache_views(kernels, batch, heads, kv_heads, keys, head_dim):
    g = torch.Generator().manual_seed(keys)
    # Scaled queries: scores spread over tens of units, so the kernel's vector exp sees a wide range.
    q = 4 * torch.randn(batch, heads, 1, head_dim, generator=g)
    # Views into a larger cache, as the engine passes them: [rows, Hkv, size, D][:, :, :S].
    k = torch.randn(batch + 1, kv_heads, keys + 16, head_dim, generator=g)[1:, :, :keys]
    v = torch.randn(batch + 1, kv_heads, keys + 16, head_dim, generator=g)[1:, :, :keys]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=heads != kv_heads)
    got = torch.ops.mellum.decode_attention(q, k, v, head_dim ** -0.5)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.decode_attention(q, k, v), got)
    with cpu_kernels.disabled():  # PyTorch's SDPA, also for inputs the kernel does not take
        torch.testing.assert_close(kernels.decode_attention(q, k, v), got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v), got,
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_activations_are_accepted(kernels):
    x, w = torch.randn(16, 6).t(), torch.randn(10, 16)  # x [6, 16] transposed view
    torch.testing.assert_close(kernels.few_rows(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_clear_errors(kernels):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x has 8 features, the weight 9"):
        kernels.few_rows(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight must be float32"):
        kernels.few_rows(x, w.double())
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernels.few_rows(x.double(), w)
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\] expected"):
        kernels.few_rows(x[None], w)
    with pytest.raises(RuntimeError, match="qweight must be int8"):
        kernels.few_rows_int8(x, w, torch.ones(4))
    with pytest.raises(RuntimeError, match="scale must be a contiguous float32 vector of 4"):
        kernels.few_rows_int8(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    attend = torch.ops.mellum.decode_attention
    with pytest.raises(RuntimeError, match=r"q \[B, H, 1, D\], k and v \[B, Hkv, S, D\] expected"):
        attend(torch.randn(1, 4, 2, 8), kv, kv, 1.0)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        attend(torch.randn(1, 3, 1, 8), kv, kv, 1.0)  # 3 heads over 2 key heads
    with pytest.raises(RuntimeError, match="one contiguous S x D block"):
        attend(q, kv.transpose(2, 3).contiguous().transpose(2, 3), kv, 1.0)
    with pytest.raises(RuntimeError, match="float32 tensors expected"):
        attend(q.double(), kv, kv, 1.0)


def test_linear_layers_take_the_kernels_and_match_pytorch(kernels, monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64, bias=False)
    split, int8 = SplitLinear(linear, 2, SplitSwitch()), Int8Linear(linear.weight)
    calls = []
    for name in ("few_rows", "few_rows_int8"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(3, 96)
    with torch.no_grad():
        got, int8_got = split(x), int8(x)
        assert calls == ["few_rows", "few_rows_int8"]
        with cpu_kernels.disabled():  # the split `bmm` and int8pack fallbacks
            assert not cpu_kernels.ready()
            fallback, int8_fallback = split(x), int8(x)
        assert cpu_kernels.ready() and len(calls) == 2
        many = torch.randn(40, 96)  # prefill-sized inputs keep PyTorch's products
        torch.testing.assert_close(split(many), F.linear(many, linear.weight), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
    torch.testing.assert_close(got, fallback, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
    # int8pack runs bf16 activations; the kernel rounds them to int16, so it is the closer one to the exact product.
    exact = F.linear(x, int8.dequantize())
    assert (int8_got - exact).abs().max() < 1e-4 < (int8_fallback - exact).abs().max()


def dequantized(model: nn.Module) -> nn.Module:
    """The model with every layer `quantize_int8` converts replaced by a float layer of its dequantized weights
    (a tied output head gets its own copy, as Int8Linear does)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and name not in ("router", "gate"):
                plain = nn.Linear(child.in_features, child.out_features, bias=False)
                plain.weight = nn.Parameter(Int8Linear(child.weight).dequantize())
                setattr(module, name, plain)
            elif isinstance(child, Experts):  # each expert's rows quantized as Int8Experts does
                int8 = Int8Experts(child)
                child.gate_up_proj.data, child.down_proj.data = int8.dequantize("gate_up_proj"), int8.dequantize("down_proj")
    return model


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_engine_with_the_kernels_decodes_the_reference_greedy_tokens(kernels, preset):
    """fp32: the uncached reference's tokens. int8: the kernel's activations are rounded to int16 only (far finer than
    the weights), so its tokens are those of an fp32 forward over the dequantized weights."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 40, 90)]
    for quantize, reference in ((None, tiny_model(preset)), ("int8", dequantized(tiny_model(preset)))):
        want = [reference_greedy(reference, p, 12) for p in prompts]
        engine = NativeEngine(tiny_model(preset), speculative=None, prefix_cache_mb=8, quantize=quantize)
        hooks = [m.decode_attention for m in engine.model.modules() if hasattr(m, "decode_attention")]
        assert len(hooks) >= engine.config.num_layers and all(h is cpu_kernels.decode_attention for h in hooks)
        try:
            assert [engine.generate(p, SamplingParams(max_new_tokens=12)).tokens for p in prompts] == want
        finally:
            engine.close()


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


FALLBACK = """
    import torch
    from mellum.engine import NativeEngine, SamplingParams, cpu_kernels
    from tests.engine.helpers import tiny_model
    engine = NativeEngine(tiny_model("tiny-dense"), speculative=None, prefix_cache_mb=8)
    tokens = engine.generate(list(range(1, 30)), SamplingParams(max_new_tokens=6)).tokens
    engine.close()
    print("ready", cpu_kernels.ready(), "tokens", len(tokens))
    print("status", cpu_kernels.status())
"""


def test_the_engine_falls_back_when_disabled_or_the_build_fails(tmp_path):
    off = _run(FALLBACK, MELLUM_CPU_KERNELS="0", MELLUM_KERNEL_DIR=str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr
    assert "ready False tokens 6" in off.stdout and "status disabled by MELLUM_CPU_KERNELS" in off.stdout
    broken = _run(FALLBACK, CXX="false", MELLUM_KERNEL_DIR=str(tmp_path / "broken"))
    assert broken.returncode == 0, broken.stderr
    assert "ready False tokens 6" in broken.stdout and "status unavailable: compiling few_rows.cpp failed" in broken.stdout
    assert "using PyTorch's products" in broken.stderr  # said once, not silently
    assert not list((tmp_path / "broken").glob("*.so")) and not list((tmp_path / "broken").glob("*.tmp*"))


def test_a_built_library_is_reused_not_rebuilt(kernels):
    path = Path(kernels.status().removeprefix("loaded "))
    before = path.stat().st_mtime_ns
    again = _run("from mellum.engine import cpu_kernels as k; raise SystemExit(k.main())",
                 MELLUM_KERNEL_DIR=str(path.parent))
    assert again.returncode == 0, again.stderr
    assert f"loaded {path}" in again.stdout and "max |difference|" in again.stdout
    assert "compiling" not in again.stderr and path.stat().st_mtime_ns == before


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch
def test_compiled_engine_traces_the_kernels(kernels):
    """`compile=True` traces the layer loop on fake tensors: the ops need their registered output shapes."""
    model = tiny_model("tiny-dense")
    prompt = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    want = reference_greedy(model, prompt, 8)
    engine = NativeEngine(tiny_model("tiny-dense"), speculative=None, prefix_cache_mb=0, compile=True)
    try:
        assert engine.generate(prompt, SamplingParams(max_new_tokens=8)).tokens == want
    finally:
        engine.close()
