import torch

from mellum.engine import NativeEngine, SamplingParams
from mellum.engine.quant import Int8Linear, quantize_int8, weight_bytes
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
