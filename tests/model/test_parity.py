"""Parity with the reference implementations in transformers, through real checkpoint files, both directions."""

from __future__ import annotations

import json

import pytest
import torch

from mellum.checkpoint import load_pretrained, save_pretrained
from mellum.config import ModelConfig, get_config
from mellum.model import Transformer, next_token_ids

transformers = pytest.importorskip("transformers")

YARN = {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0}
# transformers has no MTP module and drops mtp.* tensors when it saves, so its side is built without one.
CASES = {
    "tiny-dense": get_config("tiny-dense"),
    "tiny-moe": get_config("tiny-moe").replace(num_mtp_layers=0),
    "tiny-dense-yarn": get_config("tiny-dense").replace(rope_scaling=YARN),
    "tiny-moe-yarn": get_config("tiny-moe").replace(num_mtp_layers=0, rope_scaling=YARN),
}


def hf_model(config: ModelConfig, seed: int = 0):
    """A randomly initialised transformers model of the same architecture (no download)."""
    hf = config.to_hf_config()
    cls = {"llama": transformers.LlamaForCausalLM, "mellum": transformers.MellumForCausalLM}[config.architecture]
    conf_cls = {"llama": transformers.LlamaConfig, "mellum": transformers.MellumConfig}[config.architecture]
    hf_config = conf_cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    with torch.no_grad():  # non-trivial norms and routers, so every tensor's mapping matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def token_ids(config: ModelConfig, t: int = 48) -> torch.Tensor:
    # longer than the sliding window (16) and than YaRN's original context (32)
    return torch.randint(0, config.vocab_size, (2, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_loads_with_same_logits(case, tmp_path):
    config = CASES[case]
    ref = hf_model(config)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config == config  # config.json round trip through transformers
    ids = token_ids(config)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["tiny-dense", "tiny-moe", "tiny-moe-yarn"])
def test_our_checkpoint_loads_in_transformers_with_same_logits(case, tmp_path):
    config = CASES[case].replace(num_mtp_layers=get_config("tiny-moe").num_mtp_layers if "moe" in case else 0)
    torch.manual_seed(3)
    model = Transformer(config).eval()
    save_pretrained(model, tmp_path, max_shard_size_mb=0.1)  # sharded: index.json + several files
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = token_ids(config)
    with torch.no_grad():
        assert (ref(ids).logits - model(ids).logits).abs().max().item() <= 1e-4


def test_mtp_weights_round_trip_under_mtp_keys(tmp_path):
    torch.manual_seed(4)
    model = Transformer(get_config("tiny-moe")).eval()
    save_pretrained(model, tmp_path)
    index = json.loads((tmp_path / "config.json").read_text())
    assert index["num_nextn_predict_layers"] == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.0.gate_proj.weight"} <= keys
    loaded = load_pretrained(tmp_path)
    ids = token_ids(loaded.config, 24)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
        draft_a = model.mtp(a.hidden, next_token_ids(ids))
        draft_b = loaded.mtp(b.hidden, next_token_ids(ids))
    assert torch.equal(draft_a, draft_b)
    assert draft_a.shape == (2, 24, loaded.config.vocab_size)


def test_bf16_load_and_tokenizer_left_alone(tmp_path, tiny_tokenizer):
    torch.manual_seed(5)
    model = Transformer(get_config("tiny-dense"))
    save_pretrained(model, tmp_path, dtype="bf16")
    tiny_tokenizer.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("tokenizer")}
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))
    assert before and before == {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("tokenizer")}
    # Saving again unsharded removes no tokenizer file and leaves no stale shard.
    save_pretrained(loaded, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
