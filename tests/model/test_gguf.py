"""GGUF export: what the file holds (read back with gguf's own reader), the rotary reordering proved on attention
scores, Q8_0 within its rounding bound, clear errors, the CLI; and, where llama-cpp-python is installed, llama.cpp
itself tokenizing like our tokenizer and computing our logits and greedy tokens from the exported file."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from mellum.assets import default_model_dir  # noqa: E402
from mellum.checkpoint import load_config  # noqa: E402
from mellum.cli import main  # noqa: E402
from mellum.gguf import export_gguf, gguf_name, halves_from_pairs, pairs_from_halves  # noqa: E402
from mellum.model.rotary import apply_rotary  # noqa: E402

BUNDLED = default_model_dir()


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def read_back(path: Path) -> tuple[gguf.GGUFReader, dict[str, torch.Tensor]]:
    """The reader and every tensor dequantized to fp32 in PyTorch's [out, in] order."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(data.astype("float32").reshape([int(n) for n in reversed(t.shape)]))
    return reader, tensors


def field(reader, key):
    value = reader.get_field(key)
    assert value is not None, key
    return value.contents()


def test_f32_export_holds_the_checkpoint(tmp_path):
    summary = export_gguf(BUNDLED, tmp_path / "m.gguf", "f32", progress=False)
    config = load_config(BUNDLED)
    reader, tensors = read_back(tmp_path / "m.gguf")
    assert summary["tensors"] == len(tensors) == 3 + 9 * config.num_layers
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == config.num_layers
    assert field(reader, "llama.attention.head_count_kv") == config.num_kv_heads
    assert field(reader, "llama.rope.freq_base") == config.rope_theta
    assert field(reader, "tokenizer.ggml.pre") == summary["pre_tokenizer"] == "starcoder"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    vocab = json.loads((BUNDLED / "tokenizer.json").read_text())
    assert tokens[0] == "<|endoftext|>" and tokens[field(reader, "tokenizer.ggml.fim_pre_token_id")] == "<fim_prefix>"
    fim = {key: tokens[field(reader, f"tokenizer.ggml.fim_{key}_token_id")]
           for key in ("suf", "mid", "pad", "sep", "rep")}
    # The file separator and repository header of Mellum's prompt format: llama.cpp stops at them and builds its
    # /infill project context with them.
    assert fim == {"suf": "<fim_suffix>", "mid": "<fim_middle>", "pad": "<fim_pad>", "sep": "<filename>",
                   "rep": "<reponame>"}
    assert len(field(reader, "tokenizer.ggml.merges")) == len(vocab["model"]["merges"])
    # Every weight, exactly (bf16 checkpoint values are exact in fp32), q and k back in rotate-half order.
    for key, w in checkpoint_tensors(BUNDLED).items():
        got = tensors[gguf_name(key)]
        if key.endswith("q_proj.weight"):
            got = halves_from_pairs(got, config.num_heads)
        elif key.endswith("k_proj.weight"):
            got = halves_from_pairs(got, config.num_kv_heads)
        assert torch.equal(got, w.float()), key
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rotary for the llama architecture, written from its definition: dims (2i, 2i+1) rotate by
    position * theta^(-2i/D). x [T, H, D]."""
    d = x.shape[-1]
    angle = positions[:, None, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2)


def test_pair_order_gives_the_same_attention_scores():
    torch.manual_seed(0)
    heads, d, width, t, theta = 3, 16, 40, 7, 10000.0
    wq, wk = torch.randn(heads * d, width, dtype=torch.float64), torch.randn(heads * d, width, dtype=torch.float64)
    x = torch.randn(t, width, dtype=torch.float64)
    positions = torch.arange(t) + 5
    # Ours: rotate-half on the checkpoint's projections.
    freqs = positions[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, T, D]
    q = apply_rotary((x @ wq.T).view(1, t, heads, d).transpose(1, 2), emb.cos(), emb.sin())[0]  # [H, T, D]
    k = apply_rotary((x @ wk.T).view(1, t, heads, d).transpose(1, 2), emb.cos(), emb.sin())[0]
    # llama.cpp: adjacent pairs on the reordered projections.
    qp = rotate_pairs((x @ pairs_from_halves(wq, heads).T).view(t, heads, d), positions, theta).transpose(0, 1)
    kp = rotate_pairs((x @ pairs_from_halves(wk, heads).T).view(t, heads, d), positions, theta).transpose(0, 1)
    assert torch.allclose(q @ k.transpose(-1, -2), qp @ kp.transpose(-1, -2), atol=1e-9)
    assert not torch.allclose(q, qp)  # the vectors differ (order), only their products agree
    assert torch.equal(halves_from_pairs(pairs_from_halves(wq, heads), heads), wq)


def test_q8_0_is_within_half_a_step(tiny_model_dir, tmp_path):
    export_gguf(tiny_model_dir, tmp_path / "q.gguf", "q8_0", progress=False)
    reader, tensors = read_back(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    w = checkpoint_tensors(tiny_model_dir)["model.layers.0.mlp.down_proj.weight"].float()
    got = tensors["blk.0.ffn_down.weight"]
    step = w.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127  # one scale per block of 32
    err = (got.view_as(step.expand(-1, -1, 32)) - w.view(w.shape[0], -1, 32)).abs()
    # Rounding to the step is half a step; storing the step in fp16 moves a value 127 steps out by 127 * 2^-11 more.
    assert (err <= step * (0.5 + 127 * 2**-11) + 1e-9).all()
    assert err.max() > 0  # it did quantize


def test_tied_embeddings_export_without_an_output_matrix(tiny_model_dir, tmp_path):
    """A tied model stores no lm_head; llama.cpp then uses token_embd as the output head, so none is written."""
    import dataclasses

    import mellum
    from mellum.config import get_config
    from mellum.model import Transformer

    tied = tmp_path / "tied"
    torch.manual_seed(0)
    mellum.save_pretrained(Transformer(dataclasses.replace(get_config("tiny-dense"), tie_word_embeddings=True)), tied)
    shutil.copy(tiny_model_dir / "tokenizer.json", tied / "tokenizer.json")
    summary = export_gguf(tied, tmp_path / "tied.gguf", progress=False)
    _, tensors = read_back(tmp_path / "tied.gguf")
    assert summary["tensors"] == len(tensors) == 2 + 9 * 2
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    # Some exports store the tied head anyway (load_pretrained skips it): it is left out, not refused.
    weights = load_file(str(tied / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(tied / "model.safetensors"))
    mellum.load_pretrained(tied)
    summary = export_gguf(tied, tmp_path / "tied2.gguf", progress=False)
    assert summary["skipped"] == ["lm_head.weight"] and summary["tensors"] == 2 + 9 * 2
    assert "output.weight" not in read_back(tmp_path / "tied2.gguf")[1]


def test_errors_name_the_problem(tiny_model_dir, tmp_path):
    from mellum.config import get_config
    from mellum.model import Transformer
    import mellum

    moe = tmp_path / "moe"
    mellum.save_pretrained(Transformer(get_config("tiny-moe")), moe)
    with pytest.raises(ValueError, match="supports the Llama architecture"):
        export_gguf(moe, tmp_path / "x.gguf", progress=False)
    with pytest.raises(ValueError, match="unknown GGUF weight type"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4_k", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight has no GGUF counterpart"):
        export_gguf(broken, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.partial"))
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        export_gguf(broken, tmp_path / "x.gguf", progress=False)


def test_other_pre_tokenizers_are_refused(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="not one llama.cpp reproduces"):
        export_gguf(other, tmp_path / "x.gguf", progress=False)


def test_cli_writes_the_file(tiny_model_dir, tmp_path, capsys):
    assert main(["export", "gguf", str(tiny_model_dir), str(tmp_path / "t.gguf"), "--type", "f16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["type"] == "f16" and summary["tensors"] == 3 + 9 * 2
    assert Path(summary["path"]).stat().st_size == summary["bytes"]
    assert main(["export", "gguf", str(tmp_path / "none"), str(tmp_path / "u.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_that_does_not_match_the_tensors_is_refused(tiny_model_dir, tmp_path):
    """The metadata is written from config.json: a config.json whose shapes differ from the tensors (here another
    MLP width and key/value head count) would give llama.cpp a file it cannot load, or q/k rows reordered for the
    wrong number of heads."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(num_key_value_heads=4)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[32, 64\], "
                                         r"the config\.json implies \[64, 64\]"):
        export_gguf(broken, tmp_path / "x.gguf", progress=False)
    config.update(num_key_value_heads=2, intermediate_size=96)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight' has shape \[64, 128\]"):
        export_gguf(broken, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.glob("x.gguf*"))


def test_cli_does_not_replace_a_file_without_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    out.write_text("an earlier export")
    assert main(["export", "gguf", str(tiny_model_dir), str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_text() == "an earlier export"
    assert main(["export", "gguf", str(tiny_model_dir), str(out), "--force", "--json"]) == 0
    assert gguf.GGUFReader(out).get_field("general.architecture").contents() == "llama"
    (tmp_path / "d.gguf").mkdir()
    assert main(["export", "gguf", str(tiny_model_dir), str(tmp_path / "d.gguf"), "--force"]) == 2
    assert "is a directory" in capsys.readouterr().err and not list(tmp_path.glob("*.partial"))


# ---- llama.cpp itself (llama-cpp-python is optional: it compiles from source for minutes) ---------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("gguf") / "bundled-f32.gguf"
    export_gguf(BUNDLED, path, "f32", progress=False)
    model = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
    yield model
    model.close()


def sample_code() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return (stdlib / "textwrap.py").read_text(encoding="utf-8")[:3000] + "\n\tx = 12345 + 0.5e-3  # ünïcode 🙂\n"


def test_llama_cpp_tokenizes_like_us(llama):
    from mellum.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(BUNDLED)
    text = sample_code()
    assert llama.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    fim = "<fim_suffix>\n    return x\n<fim_prefix>def f(x):\n    x = x + 1\n<fim_middle>"
    assert llama.tokenize(fim.encode(), add_bos=False, special=True) == tokenizer.encode(fim, allow_special=True)


def test_llama_cpp_stops_at_mellums_stop_tokens(llama):
    """REFERENCE.md §1: stop on <|endoftext|>, <filename> and the FIM tokens llama.cpp treats as ends (pad, repo,
    file separator); without the file separator in the metadata llama.cpp would complete on into the next file."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    names = ["<|endoftext|>", "<filename>", "<reponame>", "<fim_pad>"]
    ids = {n: llama.tokenize(n.encode(), add_bos=False, special=True) for n in names}
    assert all(len(i) == 1 for i in ids.values()), ids
    assert {n: bool(llama_cpp.llama_vocab_is_eog(vocab, i[0])) for n, i in ids.items()} == dict.fromkeys(names, True)
    assert llama_cpp.llama_vocab_fim_sep(vocab) == ids["<filename>"][0]


def last_logits(llama) -> torch.Tensor:
    """llama.cpp's logits for the last token it evaluated."""
    import llama_cpp
    import numpy as np

    return torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1),
                                                  shape=(llama.n_vocab(),)).copy())


def test_llama_cpp_computes_our_logits_and_greedy_tokens(llama):
    from mellum import load_pretrained
    from mellum.engine import NativeEngine, SamplingParams
    from mellum.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(BUNDLED)
    prompt = tokenizer.encode(sample_code())[-400:]
    model = load_pretrained(BUNDLED)
    with torch.inference_mode():
        ours = model(torch.tensor([prompt])).logits[0, -1]
    llama.reset()
    llama.eval(prompt)
    theirs = last_logits(llama)
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max()
    engine = NativeEngine(model, model.config, speculative=None, prefix_cache_mb=0)
    try:
        expected = engine.generate(prompt, SamplingParams(max_new_tokens=32, stop_ids=())).tokens
    finally:
        engine.close()
    got = []
    for _ in range(32):
        got.append(int(last_logits(llama).argmax()))
        llama.eval([got[-1]])
    assert got == expected


def test_llama_cpp_runs_a_tied_grouped_query_model(tmp_path):
    """tiny-dense's shape (4 query heads sharing 2 key/value heads of 16 dims) with tied embeddings: the q and k
    reorderings per head count and the missing output matrix, as llama.cpp reads them."""
    import dataclasses

    import mellum
    from mellum.config import get_config
    from mellum.model import Transformer

    llama_cpp = pytest.importorskip("llama_cpp")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_config("tiny-dense"), tie_word_embeddings=True,
                                            vocab_size=load_config(BUNDLED).vocab_size)).eval()
    mellum.save_pretrained(model, tmp_path / "m")
    shutil.copy(BUNDLED / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False)
    small = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, verbose=False)
    try:
        ids = list(range(100, 160))
        small.eval(ids)
        with torch.inference_mode():
            ours = model(torch.tensor([ids])).logits[0, -1]
        assert (last_logits(small) - ours).abs().max() < 1e-3 * ours.abs().max()
    finally:
        small.close()
