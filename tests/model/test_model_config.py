"""ModelConfig: presets, validation errors, Hugging Face config.json mapping, and `mellum info` counts."""

from __future__ import annotations

import json

import pytest

from mellum.cli import main
from mellum.config import PRESETS, ModelConfig, get_config


def test_presets_build_and_are_independent_copies():
    for name in PRESETS:
        config = get_config(name)
        assert len(config.layer_types) == len(config.mlp_types) == config.num_layers
    tiny = get_config("tiny-moe")
    # tiny-moe exercises every feature of Mellum 2
    assert {"sliding_attention", "full_attention"} == set(tiny.layer_types)
    assert {"dense", "sparse"} == set(tiny.mlp_types)
    assert tiny.num_kv_heads < tiny.num_heads and tiny.qk_norm and tiny.num_mtp_layers == 1
    assert tiny.rope_theta != tiny.rope_theta_sliding and tiny.sliding_window == 16
    tiny.num_layers = 99
    assert get_config("tiny-moe").num_layers == 4
    m2 = get_config("mellum2-12b-a2.5b")
    assert m2.layer_types[:4] == ("sliding_attention",) * 3 + ("full_attention",)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("mellum-5b")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "gpt2"}, "unsupported architecture"),
        ({"num_kv_heads": 5}, "not a multiple"),
        ({"layer_types": ("full_attention", "sliding")}, "unknown entries"),
        ({"layer_types": ("sliding_attention",) * 2, "architecture": "mellum", "qk_norm": True}, "sliding_window"),
        ({"mlp_types": ("sparse", "dense")}, "num_experts"),
        ({"qk_norm": True}, "architecture 'mellum'"),
        ({"rope_scaling": {"factor": 4.0}}, "original_max_position_embeddings"),
        ({"num_mtp_layers": 2}, "num_mtp_layers"),
    ],
)
def test_invalid_configs_are_rejected_with_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny-dense").replace(**changes)


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    config = get_config(name)
    assert ModelConfig.from_hf_config(json.loads(json.dumps(config.to_hf_config()))) == config


def test_hf_config_reading_details():
    llama4 = {  # a transformers 4 style Llama config.json (rope_theta at top level, no head_dim)
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 98304, "hidden_size": 3072,
        "intermediate_size": 8256, "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 24,
        "rms_norm_eps": 1e-6, "rope_theta": 500000, "rope_scaling": None, "max_position_embeddings": 8192,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    assert ModelConfig.from_hf_config(llama4) == get_config("mellum-4b")
    with pytest.raises(ValueError, match="unsupported model architecture"):
        ModelConfig.from_hf_config({**llama4, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported RoPE type 'llama3'"):
        ModelConfig.from_hf_config({**llama4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    yarn = ModelConfig.from_hf_config(
        {**llama4, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}}
    )
    assert yarn.rope_scaling == {"factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0}
    # An MTP head on a Llama model: written under DeepSeek's key, which LlamaForCausalLM ignores; read back.
    llama_mtp = get_config("tiny-dense").replace(num_mtp_layers=1)
    hf = llama_mtp.to_hf_config()
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["num_nextn_predict_layers"] == 1
    assert ModelConfig.from_hf_config(hf) == llama_mtp
    assert (llama_mtp.mtp_layer_type, llama_mtp.mtp_mlp_type) == ("full_attention", "dense")
    assert "num_nextn_predict_layers" not in get_config("tiny-dense").to_hf_config()
    mellum = get_config("tiny-moe").to_hf_config()
    mellum["rope_parameters"]["sliding_attention"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                                      "original_max_position_embeddings": 64}
    with pytest.raises(ValueError, match="sliding_attention"):
        ModelConfig.from_hf_config(mellum)


def info_json(capsys, name) -> dict:
    assert main(["info", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_parameter_counts(capsys):
    # Mellum-4B: embeddings 2 x 98304 x 3072 + 30 x (4 x 3072^2 + 3 x 3072 x 8256 + 2 x 3072) + 3072
    m4 = info_json(capsys, "mellum-4b")
    assert m4["total_params"] == m4["active_params"] == 4_019_248_128
    m2 = info_json(capsys, "mellum2-12b-a2.5b")
    assert m2["total_params"] == 11_802_959_104 and m2["active_params"] == 2_438_913_280
    assert m2["mtp_params"] == 428_371_456
    tiny = info_json(capsys, "tiny-moe")
    per_expert = 3 * 64 * 32
    assert tiny["total_params"] - tiny["active_params"] == 3 * per_expert * (8 - 2)


def test_info_on_directory_and_bad_input(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(get_config("tiny-dense").to_hf_config()))
    assert main(["info", str(tmp_path)]) == 0
    assert "llama, 2 layers" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_layer_patterns_have_one_entry_per_layer():
    tiny = get_config("tiny-moe")
    # One entry too many would have handed the MTP layer (index num_layers) the main pattern's fifth entry.
    with pytest.raises(ValueError, match="layer_types has 5 entries for 4 layers"):
        tiny.replace(layer_types=tiny.layer_types + ("full_attention",))
    with pytest.raises(ValueError, match="mlp_types has 3 entries for 4 layers"):
        tiny.replace(mlp_types=tiny.mlp_types[:3])
    hf = tiny.to_hf_config()
    hf["num_hidden_layers"] = 3
    with pytest.raises(ValueError, match="layer_types has 4 entries for 3 layers"):
        ModelConfig.from_hf_config(hf)
    # A new depth alone keeps the first layers of a pattern, or repeats a uniform one; the MTP layer keeps its type.
    shallow = tiny.replace(num_layers=3)
    assert shallow.layer_types == ("sliding_attention",) * 3 and shallow.mlp_types == ("dense", "sparse", "sparse")
    assert shallow.all_layer_types[3] == "sliding_attention" and shallow.all_mlp_types[3] == "sparse"
    assert ModelConfig.from_hf_config(shallow.to_hf_config()) == shallow  # its config.json reads back
    assert get_config("tiny-dense").replace(num_layers=5).layer_types == ("full_attention",) * 5
    with pytest.raises(ValueError, match="cannot be extended"):
        tiny.replace(num_layers=6)


def test_rope_fields_are_honoured_or_refused():
    """config.json RoPE fields transformers acts on are never replaced by a default in silence."""
    transformers = pytest.importorskip("transformers")
    # Llama: a top-level rope_theta fills in for one rope_parameters leaves out (transformers'
    # standardize_rope_params); the default base 10000 would rotate every position differently.
    llama = {**get_config("tiny-dense").to_hf_config(), "rope_parameters": {"rope_type": "default"},
             "rope_theta": 1234.0}
    ours = ModelConfig.from_hf_config(json.loads(json.dumps(llama)))  # transformers fills the dict in place
    expected = transformers.LlamaConfig(**{k: v for k, v in llama.items() if k != "architectures"})
    assert ours.rope_theta == expected.rope_parameters["rope_theta"] == 1234.0
    # Mellum: rope parameters are keyed by layer type; transformers' MellumForCausalLM cannot run the others, and
    # reading them as the default bases (or a whole-head rotation) would make another model.
    mellum = get_config("tiny-moe").to_hf_config()
    for rope, message in [
        ({"rope_type": "default", "rope_theta": 1000.0}, "keyed by layer type"),
        ({**mellum["rope_parameters"], "full_attention": {"rope_type": "default"}}, "full_attention has no rope_theta"),
        ({**mellum["rope_parameters"], "sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                                             "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf_config({**mellum, "rope_parameters": rope})
