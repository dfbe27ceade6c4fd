"""Bad checkpoints and paths fail with errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mellum.checkpoint import key_table, load_pretrained, save_pretrained
from mellum.config import get_config
from mellum.model import Transformer


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-moe"))
    save_pretrained(model, tmp_path)
    return tmp_path


def rewrite(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_unsupported_architecture(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        load_pretrained(saved)


def test_missing_tensor_is_named(saved):
    rewrite(saved, lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.2\.self_attn\.k_norm\.weight"):
        load_pretrained(saved)


def test_missing_expert_is_named(saved):
    rewrite(saved, lambda t: t.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.5\.up_proj\.weight"):
        load_pretrained(saved)


def test_wrong_shape_is_named(saved):
    rewrite(saved, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[65\].*\[64\]"):
        load_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite(saved, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.shared_expert.weight'"):
        load_pretrained(saved)


def test_mtp_declared_but_absent(saved):
    rewrite(saved, lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    with pytest.raises(ValueError, match="no mtp.. tensors"):
        load_pretrained(saved)


def test_fused_expert_layout_is_accepted(saved):
    model = load_pretrained(saved)

    def fuse(t):
        for i in (1, 2, 3):
            p = f"model.layers.{i}.mlp.experts."
            gate = torch.stack([t.pop(f"{p}{e}.gate_proj.weight") for e in range(8)])
            up = torch.stack([t.pop(f"{p}{e}.up_proj.weight") for e in range(8)])
            t[p + "gate_up_proj"] = torch.cat([gate, up], 1)  # [E, 2I, C]
            t[p + "down_proj"] = torch.stack([t.pop(f"{p}{e}.down_proj.weight") for e in range(8)])  # [E, C, I]

    rewrite(saved, fuse)
    fused = load_pretrained(saved)
    for name, p in model.state_dict().items():
        assert torch.equal(p, fused.state_dict()[name]), name


def test_key_table_covers_every_parameter_once():
    model = Transformer(get_config("tiny-moe").replace(tie_word_embeddings=True))
    table = key_table(model)
    assert "lm_head.weight" not in table  # tied: stored once, as the embedding
    names = {piece.name for piece in table.values()}
    assert names == set(model.state_dict()) - {"lm_head.weight"}


def test_tied_embeddings_round_trip(tmp_path):
    torch.manual_seed(1)
    model = Transformer(get_config("tiny-dense").replace(tie_word_embeddings=True))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # Some exports store the tied head anyway (a copy of the embedding): it is skipped, as transformers does.
    rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    again = load_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a local path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not be downloaded from the hub") as caught:
        load_pretrained("nobody-here/no-such-model")
    assert "\n" not in str(caught.value) and "hub id" in str(caught.value)


def test_hub_failures_are_one_line_with_their_cause(monkeypatch, tmp_path):
    """`mellum complete --model JetBrains/Mellum-4b-base` without a network printed huggingface_hub's two-line
    message after "mellum: error:"; now one line: a hub id, why it failed, how to give a directory instead."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id, **kwargs):  # what huggingface_hub 2.x raises when the hub does not answer
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as exc:
            raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened "
                                          "while trying to locate the files on the Hub ...") from exc

    def broken(repo_id, **kwargs):
        raise OSError("No space left on device\nwhile writing the blob")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError) as caught:
        load_pretrained("JetBrains/Mellum-4b-base")
    assert str(caught.value) == (
        "JetBrains/Mellum-4b-base is not a local directory, and taken as a hub id it could not be downloaded from "
        "the hub: the hub could not be reached (ConnectionError: [Errno -2] Name or service not known) and the hub "
        "cache has no copy: no network, or no such repository; for a model on disk, give the path of its directory "
        "(the one with config.json)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(FileNotFoundError, match=r"hub: OSError: No space left on device; for a model") as caught:
        load_pretrained("JetBrains/Mellum-4b-base")
    assert "\n" not in str(caught.value)


def test_loaded_model_has_no_meta_tensors(saved):
    model = load_pretrained(saved)
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))


def test_corrupt_or_truncated_weights_are_named(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_pretrained(saved)
    weights.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(saved)


def test_malformed_shard_index_is_named(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Transformer(get_config("tiny-dense")), tmp_path, max_shard_size_mb=0.2)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ValueError, match="has no \"weight_map\" object"):
        load_pretrained(tmp_path)
    index.write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        ([1, 2], "holds a list, not a JSON object"),
        ({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": "64"},
         r"integer values for hidden_size='64', intermediate_size \(missing\)"),
    ],
)
def test_malformed_config_json_is_a_clear_error(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)


def test_bf16_cast_model_matches_its_saved_checkpoint(tmp_path):
    """`model.to(torch.bfloat16)` keeps the rotary frequencies in fp32, as a model loaded in bf16 builds them: the
    same weights give the same logits before and after a save/load round trip."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-moe")).to(torch.bfloat16).eval()
    assert all(b.dtype == torch.float32 for name, b in model.named_buffers() if name.endswith("inv_freq"))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype="bf16")
    ids = torch.randint(0, 1024, (1, 300))
    positions = torch.arange(4000, 4300)[None]  # far enough out that bf16 frequencies rotate visibly wrong
    with torch.no_grad():
        assert torch.equal(model(ids, positions).logits, loaded(ids, positions).logits)


def test_resaving_removes_only_its_own_stale_weight_files(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-dense"))
    save_pretrained(model, tmp_path, max_shard_size_mb=0.2)
    keep = tmp_path / "model-ema.safetensors"
    save_file({"x": torch.ones(2)}, str(keep))  # the user's own file beside the checkpoint
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model-ema.safetensors", "model.safetensors"]
    assert torch.equal(load_file(str(keep))["x"], torch.ones(2))
