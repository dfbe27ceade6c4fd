import torch

from mellum.engine import NativeEngine, SamplingParams
from mellum.engine.quant import Int8Experts, Int8Linear, quantize_int8, weight_bytes
from mellum.model.moe import Experts
from tests.engine.helpers import tiny_model


def test_int8_linear_is_close_to_the_float_layer_on_both_paths():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    q = Int8Linear(linear.weight)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (96,)
    for rows in (1, 40):  # the int8 kernel (bf16 activations) and the dequantize path
        x = torch.randn(rows, 64)
        ref = linear(x)
        err = (q(x) - ref).abs().max() / ref.abs().max()
        assert err < 0.03, (rows, float(err))


def test_quantized_engine_decodes_and_weights_shrink():
    model = tiny_model("tiny-dense")
    before = weight_bytes(model)
    engine = NativeEngine(tiny_model("tiny-dense"), quantize="int8", speculative=None, prefix_cache_mb=0)
    try:
        assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
        assert weight_bytes(engine.model) < 0.6 * before
        r = engine.generate(list(range(1, 30)), SamplingParams(max_new_tokens=8))
        assert r.stop_reason == "length" and len(r.tokens) == 8
    finally:
        engine.close()


def test_quantize_skips_what_it_must():
    model = quantize_int8(tiny_model("tiny-moe"))
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert "layers.0.self_attn.q_proj" in names and "lm_head" in names
    assert not any(isinstance(m, Experts) for m in model.modules())  # every mixture's experts are int8 now
    assert not any(isinstance(m, Int8Linear) for n, m in model.named_modules() if n.endswith(".gate"))
    kept = quantize_int8(tiny_model("tiny-moe"), experts=False)
    assert any(isinstance(m, Experts) for m in kept.modules()) and not any(isinstance(m, Int8Experts)
                                                                          for m in kept.modules())


def test_int8_experts_match_the_float_experts_on_both_paths():
    """Few rows (the int8 kernel per expert) and many rows (dequantized products) against the float experts."""
    torch.manual_seed(0)
    experts = Experts(4, 32, 24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2), torch.nn.init.normal_(experts.down_proj, std=0.2)
    int8 = Int8Experts(experts)
    assert int8.qgate_up_proj.dtype == torch.int8 and int8.gate_up_proj_scale.shape == (4, 48)
    for rows in (3, 40):
        x = torch.randn(rows, 32)
        idx = torch.stack([torch.randperm(4)[:2] for _ in range(rows)])  # [N, 2]
        w = torch.softmax(torch.randn(rows, 2), dim=-1)
        ref = experts(x, w, idx)
        err = (int8(x, w, idx) - ref).abs().max() / ref.abs().max()
        assert err < 0.03, (rows, float(err))
        # Exactly the float experts over the dequantized weights, up to the kernel's int16 activations.
        exact = Experts(4, 32, 24)
        exact.gate_up_proj.data, exact.down_proj.data = int8.dequantize("gate_up_proj"), int8.dequantize("down_proj")
        torch.testing.assert_close(int8(x, w, idx), exact(x, w, idx), rtol=1e-3, atol=1e-4)
